"""Calibration windows: random `seqlen`-token windows from C4 (or any text set), as SparseGPT samples.

`document` windowing is the original: draw a document uniformly, redraw until it has more than
`seqlen` tokens, take a random window of it. The offline C4 sample holds few documents longer than
2048 tokens, so `concat` windowing joins all documents with blank lines first and draws windows from
the stream (documented in docs/DEVIATIONS.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from dpruner.data.files import data_file, read_jsonl
from dpruner.errors import DPrunerError

# Calibration defaults of SparseGPT / the original general.py (§2.1-2.2 of the upstream notes).
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
DEFAULT_SEED = 0
WINDOWING_MODES = ("document", "concat")
C4_SOURCES = ("local", "hub")
# The shard the original reads from the hub.
C4_HUB_SHARD = "en/c4-train.00000-of-01024.json.gz"
# The 30 OLMo fixture documents are held out of calibration: they are the offline C4 perplexity text.
C4_LOCAL_FILES = ("c4_sample",)
C4_HELDOUT_FILES = ("c4_olmo_01", "c4_olmo_02", "c4_olmo_03")


def c4_documents(source: str = "local", data_root: str | None = None) -> list[str]:
    """C4 texts: the offline sample (200 documents) or the original's hub shard when online."""
    if source == "local":
        docs: list[str] = []
        for name in C4_LOCAL_FILES:
            docs.extend(row["text"] for row in read_jsonl(data_file(name, data_root), required=("text",)))
        return docs
    if source == "hub":
        import datasets

        try:
            shard = datasets.load_dataset("allenai/c4", data_files={"train": C4_HUB_SHARD}, split="train")
        except Exception as err:  # offline, or the hub refused
            raise DPrunerError(f"C4 from the hub (allenai/c4 {C4_HUB_SHARD}) failed: {str(err).splitlines()[0]}") from None
        return list(shard["text"])
    raise DPrunerError(f"C4 source {source!r} is not one of {', '.join(C4_SOURCES)}")


def sample_windows(tokenizer, texts: Sequence[str], nsamples: int, seqlen: int, seed: int = DEFAULT_SEED,
                   windowing: str = "document") -> torch.Tensor:
    """`nsamples` windows of `seqlen` token ids, shape [nsamples, seqlen], deterministic in `seed`."""
    if nsamples < 1 or seqlen < 2:
        raise DPrunerError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if windowing not in WINDOWING_MODES:
        raise DPrunerError(f"windowing {windowing!r} is not one of {', '.join(WINDOWING_MODES)}")
    rng = random.Random(seed)
    if windowing == "concat":
        stream = tokenizer("\n\n".join(texts)).input_ids
        if len(stream) <= seqlen:
            raise DPrunerError(f"the calibration text has {len(stream)} tokens, fewer than seqlen={seqlen}")
        starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
        return torch.tensor([stream[s:s + seqlen] for s in starts], dtype=torch.long)

    encoded: dict[int, list[int]] = {}

    def tokens(index: int) -> list[int]:
        if index not in encoded:
            encoded[index] = tokenizer(texts[index]).input_ids
        return encoded[index]

    long_enough = sum(1 for i in range(len(texts)) if len(tokens(i)) > seqlen)
    if long_enough == 0:
        raise DPrunerError(
            f"no calibration document is longer than seqlen={seqlen} tokens; "
            "use --windowing concat or a shorter --seqlen")
    windows = []
    for _ in range(nsamples):
        while True:
            index = rng.randint(0, len(texts) - 1)
            ids = tokens(index)
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long)

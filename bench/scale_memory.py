#!/usr/bin/env python3
"""Peak memory of streamed stage 1 and stage 3 on checkpoints this machine cannot hold whole.

For each depth, writes a random bf16 LLaMA-shaped checkpoint (bench/random_checkpoint.py), runs
`general.py --offload disk` (SparseGPT scores, fp32 compute as on CPU) and `save_model.py --offload
disk` on its scores, each in a fresh process under an address-space limit (`--limit-gb`, RLIMIT_AS)
smaller than the deepest checkpoint, and reads each process's peak RSS from wait4. The floor is the
peak RSS of the same interpreter that only imports the CLI's modules and loads the tokenizer. The
target: peak - floor <= 1.5 x (embeddings + 2 layers + activations), all in the compute dtype, flat
in depth. Everything written goes under --workdir and is deleted after each depth.

Example: python bench/scale_memory.py --shape smollm2-360m --depths 10 30 96 --limit-gb 1.75 --nsamples 8 --seqlen 128
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from random_checkpoint import SHAPES, llama_config, write_checkpoint  # noqa: E402

GB = 2**30
# The target: peak <= TARGET_FACTOR x (embeddings + 2 layers + activations).
TARGET_FACTOR = 1.5
FP32 = 4
FLOOR_CODE = ("import sys; sys.argv = ['general.py']; import runpy; "
              "from dpruner.models import embedded_model_dir; from transformers import AutoTokenizer; "
              "import dpruner.pipeline, dpruner.stage3, dpruner.streaming; "
              "AutoTokenizer.from_pretrained(embedded_model_dir())")


def run_limited(command: list[str], limit_bytes: int | None) -> tuple[float, float]:
    """Run `command` under RLIMIT_AS; return (its own peak RSS in bytes, seconds). Fails loudly."""
    def limit() -> None:
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    began = time.time()
    # Fewer malloc arenas and no tokenizer threads: less reserved address space, the same results.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1",
               MALLOC_ARENA_MAX="2", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, preexec_fn=limit, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=errors, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN is a max over all)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{errors.read()[-3000:]}")
    return usage.ru_maxrss * 1024, time.time() - began


def sizes(shape: str, layers: int, vocab: int, tokens: int) -> dict[str, float]:
    """Bytes of the parts the target names (compute dtype fp32) and of the bf16 checkpoint."""
    config = llama_config(shape, layers, vocab)
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden
    return {"layer": layer * FP32, "embeddings": embeddings * FP32, "activations": 2 * tokens * hidden * FP32,
            "checkpoint": (layers * layer + 2 * embeddings + hidden) * 2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--limit-gb", type=float, default=2.5, help="RLIMIT_AS of each measured process (GiB)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=REPO / "outputs" / "scale_memory")
    args = parser.parse_args(argv)
    python = sys.executable
    limit = int(args.limit_gb * GB)
    floor, _ = run_limited([python, "-c", FLOOR_CODE], limit)
    from transformers import AutoTokenizer

    from dpruner.models import embedded_model_dir

    vocab = len(AutoTokenizer.from_pretrained(embedded_model_dir()))
    print(f"shape {args.shape}, vocab {vocab}, {args.nsamples} x {args.seqlen} calibration tokens, "
          f"RLIMIT_AS {args.limit_gb:g} GiB, floor (interpreter + libraries + tokenizer) {floor / GB:.2f} GiB")
    header = ("| depth | checkpoint GiB | stage | peak RSS GiB | peak - floor GiB | / checkpoint | / one layer "
              "| / target | s |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for depth in args.depths:
        work = args.workdir / f"depth{depth}"
        shutil.rmtree(work, ignore_errors=True)
        model = write_checkpoint(work / "model", args.shape, depth)
        size = sizes(args.shape, depth, vocab, args.nsamples * args.seqlen)
        target = TARGET_FACTOR * (size["embeddings"] + 2 * size["layer"] + size["activations"])
        stages = {
            "stage 1": [python, "code/general.py", str(model), "c4", "--offload", "disk", "--nsamples",
                        str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(work / "scores")],
            "stage 3": [python, "code/save_model.py", str(model), str(work / "scores"), str(work / "pruned"),
                        "--offload", "disk"],
        }
        for stage, command in stages.items():
            peak, seconds = run_limited(command, limit)
            above = peak - floor
            print(f"| {depth} | {size['checkpoint'] / GB:.2f} | {stage} | {peak / GB:.2f} | {above / GB:.2f} "
                  f"| {peak / size['checkpoint']:.2f} | {above / size['layer']:.1f} | {above / target:.2f} "
                  f"| {seconds:.0f} |", flush=True)
        shutil.rmtree(work)
    print(f"one layer (fp32) {size['layer'] / GB:.3f} GiB, embeddings (fp32) {size['embeddings'] / GB:.3f} GiB, "
          f"activations {size['activations'] / GB:.3f} GiB; target = {TARGET_FACTOR} x (embeddings + 2 layers + "
          "activations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

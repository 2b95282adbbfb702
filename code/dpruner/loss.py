"""The next-token loss with the vocabulary projection done a chunk of tokens at a time.

With a small model and a large vocabulary (the embedded model: hidden 576, vocabulary 49,152) the
full-batch logits and their softmax copies outweigh the model itself. Each chunk's logits are
recomputed in backward (non-reentrant checkpoint), so only one chunk's logits are ever alive. The
value is the model's own loss (mean over labelled tokens) up to summation order, and the LM head's
gradient still reaches its parameter in one accumulation, which LOMO's per-parameter hook relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpruner.errors import DPrunerError

IGNORE_INDEX = -100  # Hugging Face's label for tokens outside the loss (padding)
# Relative gap between our loss and the model's own loss beyond which a model is rejected
# (checked once; fp16 kernels on row subsets round differently, soft-capping is off by far more).
AGREEMENT_RTOL = 1e-3


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens; `chunk_tokens` None = the model's own loss."""
    if not chunk_tokens:
        return model(**batch).loss
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
    targets = batch["labels"][:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))[keep]
    targets = targets[keep]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, head, hidden[start:stop], targets[start:stop], use_reentrant=False)
    return total / max(targets.numel(), 1)


@torch.no_grad()
def check_chunked_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None) -> None:
    """Refuse a model whose own loss does more than decoder -> LM head -> cross-entropy (e.g. logit
    soft-capping), where the chunked loss would silently train on something else. One sequence (the
    one with the most labelled tokens) is enough to tell, and keeps the model's own full logits small."""
    if not chunk_tokens:
        return
    row = int((batch["labels"] != IGNORE_INDEX).sum(dim=1).argmax())
    batch = {key: value[row:row + 1] for key, value in batch.items()}
    ours = float(causal_lm_loss(model, batch, chunk_tokens))
    reference = float(model(**batch).loss)
    if abs(ours - reference) > AGREEMENT_RTOL * max(abs(reference), 1.0):
        raise DPrunerError(f"loss_chunk_tokens={chunk_tokens}: chunked loss {ours:.6f} differs from the model's "
                           f"own loss {reference:.6f} for {type(model).__name__}; set loss_chunk_tokens: null")

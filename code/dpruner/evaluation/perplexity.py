"""Perplexity over windows of one token stream, batched, with per-window losses computed by us.

Two protocols share the window machinery:
* the original's (Hugging Face "fixed-length model" recipe): windows of `max_length` every `stride`
  tokens, each scoring only the tokens the previous window did not reach;
* SparseGPT/Wanda's: non-overlapping full windows (`stride == max_length`, remainder dropped).

We compute the log-probabilities ourselves instead of using `outputs.loss`, so a batch of windows
gives the same numbers as one window at a time, and the vocabulary projection runs only at the
scored positions (`logits_to_keep`), which is most of the saving over the original loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.errors import DPrunerError

# The original's window (legal_perplexity_evaluation.py; SparseGPT/Wanda for WikiText-2 and C4). A domain's
# window and stride are in its spec (config/domains/*.yaml: perplexity.window, perplexity.stride).
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream; the last `scored` of them are predicted and scored."""

    begin: int
    end: int
    scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(n_tokens: int, max_length: int, stride: int, full_only: bool = False) -> list[Window]:
    """Windows as the HF recipe walks them; `full_only` drops a short last window (SparseGPT).

    A window scores `end - prev_end` tokens, except that its first token can never be predicted
    (the recipe's labels are shifted inside the model), so the first window scores `length - 1`.
    """
    if n_tokens < 2:
        raise DPrunerError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    if max_length < 2 or not 1 <= stride <= max_length:
        raise DPrunerError(f"need max_length >= 2 and 1 <= stride <= max_length, got {max_length} and {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        if full_only and end - begin < max_length:
            break
        windows.append(Window(begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    if not windows:
        raise DPrunerError(f"the text has {n_tokens} tokens, fewer than one window of {max_length}")
    return windows


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_log_probs(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
    """log p(input_ids[b, p + 1] | cache, input_ids[b, :p + 1]) for every p in positions[b], shape [B, K].

    Logits are upcast to fp32 before the softmax, as the HF loss does.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions,
                   cache=cache, use_cache=cache is not None).logits.float()
    targets = torch.take_along_dim(input_ids, positions + 1, dim=1)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class PerplexityResult:
    window_losses: list[float]  # mean NLL of each window's scored tokens
    window_tokens: list[int]  # how many tokens each window scored
    total_nll: float
    n_tokens: int

    @property
    def ppl_window_mean(self) -> float:
        """The original's number: exp of the unweighted mean of per-window mean losses."""
        return math.exp(sum(self.window_losses) / len(self.window_losses))

    @property
    def ppl_token_weighted(self) -> float:
        """The standard number: exp of the NLL summed over all scored tokens, per scored token."""
        return math.exp(self.total_nll / sum(self.window_tokens))

    def summary(self) -> dict[str, Any]:
        return {"ppl_window_mean": self.ppl_window_mean, "ppl_token_weighted": self.ppl_token_weighted,
                "windows": len(self.window_losses), "tokens": self.n_tokens,
                "scored_tokens": sum(self.window_tokens)}


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length and scored count, at most `batch_size` per batch."""
    batches = []
    for _, group in groupby(windows, key=lambda w: (w.length, w.scored)):
        group = list(group)
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    return batches


@torch.inference_mode()
def window_perplexity(model: nn.Module, token_ids: torch.Tensor, windows: list[Window], batch_size: int = 1,
                      progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Score `windows` of the 1-D `token_ids`, `batch_size` windows per forward pass."""
    if batch_size < 1:
        raise DPrunerError(f"batch size must be >= 1, got {batch_size}")
    device = model_device(model)
    losses: list[float] = []
    counts: list[int] = []
    total = 0.0
    for batch in tqdm(_batches(windows, batch_size), desc=desc, unit="batch", disable=not progress):
        length, scored = batch[0].length, batch[0].scored
        input_ids = torch.stack([token_ids[w.begin:w.end] for w in batch]).to(device)
        positions = torch.arange(length - scored - 1, length - 1, device=device).expand(len(batch), -1)
        nll = -token_log_probs(model, input_ids, positions).double()
        losses.extend((nll.sum(dim=1) / scored).tolist())
        counts.extend([scored] * len(batch))
        total += float(nll.sum())
    return PerplexityResult(losses, counts, total, len(token_ids))

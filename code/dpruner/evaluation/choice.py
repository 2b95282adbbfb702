"""Multiple choice by length-normalized log-likelihood (CaseHOLD, PubMedQA, MedNLI).

As the original test_casehold.py: each candidate is appended to the context, the pair is tokenized
jointly without special tokens, the candidate's tokens are those after the context's own token
count, and its score is their mean log-probability. The original assumes the context's tokens are a
prefix of the joint tokens; we keep its rule (so numbers are comparable) and count the pairs where
that assumption fails.

Unlike the original (one full forward pass per candidate) the tokens all candidates of an example
share are encoded once; the candidates then run as one right-padded batch on top of that key/value
cache, and the vocabulary projection runs only at the candidate positions. The context is most of
each sequence, so on CaseHOLD this does roughly a quarter of the original's work
(bench/eval_throughput.py measures it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.data.eval_sets import ChoiceExample
from dpruner.errors import DPrunerError
from dpruner.evaluation.perplexity import model_device, token_log_probs

# The original tokenizes CaseHOLD pairs with add_special_tokens=False (no BOS); we do so for every set.
ADD_SPECIAL_TOKENS = False


@dataclass(frozen=True)
class _Tokenized:
    """One example: `prefix` is encoded once; candidate c continues with `continuations[c]`, whose
    tokens from `starts[c]` on are the candidate's (scored) tokens."""

    prefix: list[int]
    continuations: list[list[int]]
    starts: list[int]


@dataclass
class ChoiceScores:
    scores: list[list[float]]  # [example][candidate] mean log-probability of the candidate tokens
    prefix_mismatches: int  # pairs whose joint tokenization does not start with the context's tokens
    truncated: int  # examples cut from the left to fit max_length
    token_counts: list[list[int]]  # [example][candidate] scored tokens (mean * count = summed log-probability)

    @property
    def predictions(self) -> list[int]:
        return [first_argmax(row) for row in self.scores]

    def summed(self) -> list[list[float]]:
        """Summed candidate log-probabilities (lm-evaluation-harness's `acc` ranks by these)."""
        return [[mean * count for mean, count in zip(row, counts)] for row, counts in zip(self.scores, self.token_counts)]


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first index, as the original's strict `>` loop."""
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _tokenize(tokenizer, example: ChoiceExample, max_length: int) -> tuple[_Tokenized, int, bool]:
    """Split an example's joint tokenizations into the shared prefix and per-candidate continuations.

    An example longer than `max_length` loses the same number of leading tokens in every candidate.
    """
    context = tokenizer(example.context, add_special_tokens=ADD_SPECIAL_TOKENS).input_ids
    joints = [tokenizer(example.context + candidate, add_special_tokens=ADD_SPECIAL_TOKENS).input_ids
              for candidate in example.candidates]
    for index, joint in enumerate(joints):
        if len(joint) <= len(context):
            raise DPrunerError(f"example {example.id}: candidate {index} ({example.candidates[index]!r:.40}) "
                               "adds no tokens to the context")
    mismatches = sum(joint[:len(context)] != context for joint in joints)
    cut = max(0, max(map(len, joints)) - max_length)
    if cut >= len(context):
        raise DPrunerError(f"example {example.id}: a candidate alone is longer than --max-length {max_length} allows")
    joints = [joint[cut:] for joint in joints]
    context_len = len(context) - cut
    # Keep at least the context's last token out of the prefix: its logits score the first candidate token.
    shared = min(len(os.path.commonprefix(joints)), context_len - 1)
    tokenized = _Tokenized(joints[0][:shared], [joint[shared:] for joint in joints],
                           [context_len - shared] * len(joints))
    return tokenized, mismatches, cut > 0


def _candidate_means(model: nn.Module, item: _Tokenized, chunk: range, cache, pad: int) -> list[float]:
    device = model_device(model)
    continuations = [item.continuations[c] for c in chunk]
    width = max(map(len, continuations))
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(chunk), len(item.prefix) + width), dtype=torch.long)
    attention_mask[:, :len(item.prefix)] = 1
    for row, tokens in enumerate(continuations):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        attention_mask[row, len(item.prefix):len(item.prefix) + len(tokens)] = 1
    starts = torch.tensor([item.starts[c] for c in chunk])
    lengths = torch.tensor([len(tokens) for tokens in continuations]) - starts  # candidate tokens per row
    offsets = torch.arange(int(lengths.max()))
    positions = (starts[:, None] - 1 + offsets).clamp(max=width - 2)  # logits at p predict token p + 1
    if cache is not None:  # the candidates extend their own copy of the prefix's cache
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(chunk))
    log_probs = token_log_probs(model, input_ids.to(device), positions.to(device), attention_mask.to(device), cache)
    valid = offsets[None, :] < lengths[:, None]
    return ((log_probs.cpu().double() * valid).sum(dim=1) / lengths).tolist()


@torch.inference_mode()
def score_choices(model: nn.Module, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16,
                  max_length: int = 4096, progress: bool = True) -> ChoiceScores:
    """Mean candidate log-probability for every (example, candidate); `batch_size` candidates per pass."""
    if batch_size < 1:
        raise DPrunerError(f"batch size must be >= 1, got {batch_size}")
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = []
    counts: list[list[int]] = []
    mismatches = truncated = 0
    for example in tqdm(examples, desc="choices", unit="example", disable=not progress):
        item, example_mismatches, was_cut = _tokenize(tokenizer, example, max_length)
        mismatches += example_mismatches
        truncated += was_cut
        cache = None
        if item.prefix:
            cache = model(input_ids=torch.tensor([item.prefix], device=device), use_cache=True,
                          logits_to_keep=1).cache
        row: list[float] = []
        for start in range(0, len(example.candidates), batch_size):
            row.extend(_candidate_means(model, item, range(start, min(start + batch_size, len(example.candidates))),
                                        cache, pad))
        scores.append(row)
        counts.append([len(tokens) - start for tokens, start in zip(item.continuations, item.starts)])
    return ChoiceScores(scores, mismatches, truncated, counts)

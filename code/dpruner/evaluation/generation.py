"""Summary generation as the original test_billsum.py: sample a continuation, keep its first line.

Batched with left padding. Because only the text before the first newline is kept, a row stops as
soon as it emits a token containing "\\n": the kept text is identical to generating all
`max_new_tokens` (later tokens never change earlier ones) and most of the decoding time is saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.errors import DPrunerError
from dpruner.evaluation.perplexity import model_device

# test_billsum.py's model.generate settings (upstream notes §5.3). The original sets no seed.
TEMPERATURE = 0.1
TOP_K = 50
TOP_P = 1.0
REPETITION_PENALTY = 1.1
DEFAULT_MAX_NEW_TOKENS = 1000
DEFAULT_SEED = 0  # ours: makes sampled runs repeatable


@dataclass(frozen=True)
class DecodingSettings:
    greedy: bool = False
    seed: int = DEFAULT_SEED
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_at_newline: bool = True

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            sampling: dict[str, Any] = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P}
        return {**sampling, "repetition_penalty": REPETITION_PENALTY, "max_new_tokens": self.max_new_tokens,
                "num_return_sequences": 1, "use_cache": True}

    def record(self) -> dict[str, Any]:
        """What a result file states about decoding."""
        return {**self.generate_kwargs(), "seed": self.seed, "stop_at_newline": self.stop_at_newline}


def first_line(text: str) -> str:
    """The original's rule: keep the text before the first newline."""
    return text.split("\n", 1)[0]


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every token whose text contains a newline (a newline is one byte, so one token)."""
    return torch.tensor([i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])], dtype=torch.long)


def _stop_at_newline(newline_ids: torch.Tensor):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtNewline(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.isin(input_ids[:, -1], newline_ids.to(input_ids.device))

    return StoppingCriteriaList([StopAtNewline()])


@dataclass
class Generations:
    texts: list[str]  # first lines, in input order
    truncated: int  # prompts cut from the left to fit max_prompt_tokens


@torch.inference_mode()
def generate_first_lines(model: nn.Module, tokenizer, prompts: Sequence[str], settings: DecodingSettings,
                         batch_size: int = 8, max_prompt_tokens: int | None = None,
                         progress: bool = True) -> Generations:
    """The first line of each prompt's continuation (new tokens only, special tokens skipped).

    Prompts get the tokenizer's default special tokens (BOS for LLaMA), as the original. Sampled
    output depends on the seed and on how prompts are batched (they share one random stream).
    """
    if batch_size < 1 or settings.max_new_tokens < 1:
        raise DPrunerError(f"need batch size and max new tokens >= 1, got {batch_size} and {settings.max_new_tokens}")
    encoded = [tokenizer(prompt).input_ids for prompt in prompts]
    truncated = 0
    if max_prompt_tokens is not None:
        truncated = sum(len(ids) > max_prompt_tokens for ids in encoded)
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    device = model_device(model)
    pad = tokenizer.pad_token_id
    extra = {"stopping_criteria": _stop_at_newline(newline_token_ids(tokenizer))} if settings.stop_at_newline else {}
    torch.manual_seed(settings.seed)
    texts = [""] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="generation", unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                pad_token_id=pad, **settings.generate_kwargs(), **extra)
        decoded = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        for index, text in zip(batch, decoded):
            texts[index] = first_line(text)
    return Generations(texts, truncated)

"""Magnitude pruning: prune the smallest |W| of each matrix (SparseGPT's `--gmp`, Wanda's `magnitude`).

It also holds `ScoreMaskMethod`, the shared part of every method that only ranks weights and zeroes the
lowest (magnitude, Wanda, D-Pruner's scores): pick the comparison group, mask, no weight update.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from dpruner.errors import DPrunerError
from dpruner.masks import parse_pattern, select
from dpruner.methods.base import LayerOutcome, LayerStats, PruningMethod, register

# Comparison groups a score method can use (see dpruner.masks.select); an N:M pattern overrides them.
SCOPES = ("matrix", "block", "row")


class ScoreMaskMethod(PruningMethod):
    """Rank the weights of a linear by `scores()`, zero the lowest `sparsity` of each comparison group
    (or N of every M inputs per row), and keep the other weights unchanged."""

    default_scope: ClassVar[str]

    def __init__(self, sparsity: float, pattern: str = "unstructured", scope: str | None = None,
                 blocks: int = 32) -> None:  # blocks: the original save_model_iterative.py's 32 column blocks
        self.sparsity = sparsity
        self.pattern = pattern
        self.n_m = parse_pattern(pattern)
        self.scope = scope or self.default_scope
        if self.scope not in SCOPES:
            raise DPrunerError(f"mask scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        self.blocks = blocks

    def settings(self) -> dict:
        group = "n:m" if self.n_m else self.scope
        return {"method": self.name, "sparsity": self.n_m[0] / self.n_m[1] if self.n_m else self.sparsity,
                "pattern": self.pattern, "scope": group, "blocks": self.blocks if group == "block" else None}

    def group_widths(self, in_features: int) -> tuple[int, ...]:
        return (in_features // self.blocks,) if self.scope == "block" else (in_features,)

    @abstractmethod
    def scores(self, layer: int, module_name: str, weight: torch.Tensor,
               stats: dict[str, LayerStats] | None) -> torch.Tensor:
        """fp32 scores shaped like `weight`; the lowest are pruned."""

    def prune(self, layer: int, module_name: str, weight: torch.Tensor,
              stats: dict[str, LayerStats] | None) -> LayerOutcome:
        scores = self.scores(layer, module_name, weight, stats).float()
        mask = select(scores, self.sparsity_at(layer), scope=self.scope, blocks=self.blocks, pattern=self.pattern)
        return LayerOutcome(scores=scores, weight=weight.masked_fill(mask, 0), mask=mask)


@register
class Magnitude(ScoreMaskMethod):
    name = "magnitude"
    statistic = None
    default_scope = "matrix"  # SparseGPT --gmp and Wanda's magnitude: one |W| threshold per matrix

    def scores(self, layer: int, module_name: str, weight: torch.Tensor,
               stats: dict[str, LayerStats] | None) -> torch.Tensor:
        return weight.float().abs()

"""D-Pruner's scores as a layer method: prune each linear by precomputed importance (stage 2's dual
importance, or any score folder such as stage 1's or another method's `--save-scores`).

Data-free at prune time, so the weights it masks are the original ones, as in stage 3; running it
through the layer-wise driver gives D-Pruner the same N:M patterns, reports and sweeps as the other
methods. The default comparison group is the matrix (the original save_model.py).
"""

from __future__ import annotations

import os

import torch

from dpruner.errors import DPrunerError
from dpruner.io import ScoreSet
from dpruner.methods.base import LayerStats, register
from dpruner.methods.magnitude import ScoreMaskMethod


@register
class DPrunerScores(ScoreMaskMethod):
    name = "dpruner"
    statistic = None
    default_scope = "matrix"  # the original save_model.py: one percentile threshold per matrix

    def __init__(self, sparsity: float, scores: str | os.PathLike, **options) -> None:
        super().__init__(sparsity, **options)
        self.score_set = ScoreSet.open(scores)
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None  # one layer's file, read once

    def settings(self) -> dict:
        return super().settings() | {"scores": str(self.score_set.folder), "scores_layout": self.score_set.layout,
                                     "scores_kind": self.score_set.manifest.get("kind")}

    def _layer(self, layer: int) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != layer:
            if layer >= self.score_set.num_layers:
                raise DPrunerError(f"importance {self.score_set.folder} has scores for {self.score_set.num_layers} "
                                   f"layers; the model has more (layer {layer})")
            self._cached = (layer, self.score_set.layer(layer))
        return self._cached[1]

    def scores(self, layer: int, module_name: str, weight: torch.Tensor,
               stats: dict[str, LayerStats] | None) -> torch.Tensor:
        where = f"importance {self.score_set.folder}: layer {layer} {module_name}"
        tensors = self._layer(layer)
        if module_name not in tensors:
            raise DPrunerError(f"{where} is missing (found {', '.join(sorted(tensors)) or 'nothing'})")
        score = tensors[module_name]
        if score.shape != weight.shape:
            raise DPrunerError(f"{where} has shape {list(score.shape)}, the model's weight is {list(weight.shape)}")
        if not torch.isfinite(score).all():
            raise DPrunerError(f"{where} holds NaN/inf values; scores must be finite")
        return score.to(weight.device)

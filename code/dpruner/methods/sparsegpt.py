"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with error compensation. Its saliency is
D-Pruner's general importance (stage 1)."""

from __future__ import annotations

import torch

from dpruner.masks import parse_pattern
from dpruner.methods.base import LayerOutcome, LayerStats, PruningMethod, register, single_set
from dpruner.obs import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP, obs_prune


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    statistic = "hessian"

    def __init__(self, sparsity: float, pattern: str = "unstructured", blocksize: int = DEFAULT_BLOCKSIZE,
                 percdamp: float = DEFAULT_PERCDAMP) -> None:
        self.sparsity = sparsity
        self.pattern = pattern
        self.n_m = parse_pattern(pattern)
        self.blocksize = blocksize
        self.percdamp = percdamp

    def settings(self) -> dict:
        return {"method": self.name, "sparsity": self.sparsity, "pattern": self.pattern,
                "blocksize": self.blocksize, "percdamp": self.percdamp}

    def group_widths(self, in_features: int) -> tuple[int, ...]:
        """The OBS sweep prunes within blocks of `blocksize` columns (the last one may be narrower)."""
        return tuple(w for w in (min(self.blocksize, in_features), in_features % self.blocksize) if w)

    def hessian(self, stats: dict[str, LayerStats] | None) -> torch.Tensor:
        """The Hessian to prune with; MixCal overrides this to mix calibration sets."""
        return single_set(stats, self.name).hessian()

    def prune(self, layer: int, module_name: str, weight: torch.Tensor,
              stats: dict[str, LayerStats] | None) -> LayerOutcome:
        result = obs_prune(weight, self.hessian(stats), self.sparsity_at(layer), blocksize=self.blocksize,
                           percdamp=self.percdamp, n_m=self.n_m)
        return LayerOutcome(scores=result.saliency, weight=result.weight, mask=result.mask, loss=result.loss)

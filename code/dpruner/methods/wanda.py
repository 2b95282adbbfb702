"""Wanda (Sun et al., 2024): score |W_ij| * ||X_j||_2 and prune the lowest of each output row.

The input norm is that of the calibration tokens entering the layer (after sequential propagation),
taken as sqrt(sum over tokens of x_j^2 / nsamples) as the original's running mean does; the per-layer
constant 1/nsamples does not change any ranking. No weight update.
"""

from __future__ import annotations

import torch

from dpruner.methods.base import LayerStats, register, single_set
from dpruner.methods.magnitude import ScoreMaskMethod


@register
class Wanda(ScoreMaskMethod):
    name = "wanda"
    statistic = "input_norms"
    default_scope = "row"  # the original sorts each output row separately (per-output comparison group)

    def scores(self, layer: int, module_name: str, weight: torch.Tensor,
               stats: dict[str, LayerStats] | None) -> torch.Tensor:
        entry = single_set(stats, self.name)
        norms = torch.sqrt(entry.sq_norms.float() / entry.nsamples)
        return weight.float().abs() * norms.to(weight.device).unsqueeze(0)

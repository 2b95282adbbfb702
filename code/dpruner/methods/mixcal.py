"""MixCal / cross-calibration (Williams et al., 2025, arXiv 2502.18424): SparseGPT with a Hessian
blended from general and domain calibration text, H = alpha * H_general + (1 - alpha) * H_domain.

Training-free: each set's Hessian 2/n sum x x^T is normalised by its own sample count, so alpha weighs
the two sources independently of how many windows each has. alpha = 1 is SparseGPT on the general set,
alpha = 0 SparseGPT on the domain set.
"""

from __future__ import annotations

import torch

from dpruner.errors import DPrunerError
from dpruner.methods.base import LayerStats, register
from dpruner.methods.sparsegpt import SparseGPT

GENERAL_SET = "general"
DOMAIN_SET = "domain"
# An even blend when none is given (our default; the brief's H = a*H_general + (1-a)*H_domain).
DEFAULT_ALPHA = 0.5


@register
class MixCal(SparseGPT):
    name = "mixcal"
    # The named calibration sets this method needs (the pipeline builds them instead of one pooled set).
    calibration_sets = (GENERAL_SET, DOMAIN_SET)

    def __init__(self, sparsity: float, alpha: float = DEFAULT_ALPHA, **options) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise DPrunerError(f"--alpha must be in [0, 1], got {alpha}")
        super().__init__(sparsity, **options)
        self.alpha = alpha

    def settings(self) -> dict:
        return super().settings() | {"alpha": self.alpha}

    def hessian(self, stats: dict[str, LayerStats] | None) -> torch.Tensor:
        if not stats or set(stats) != set(self.calibration_sets):
            raise DPrunerError(f"method {self.name} needs the calibration sets {GENERAL_SET!r} and {DOMAIN_SET!r}, "
                               f"got {sorted(stats or {})}")
        return self.alpha * stats[GENERAL_SET].hessian() + (1.0 - self.alpha) * stats[DOMAIN_SET].hessian()

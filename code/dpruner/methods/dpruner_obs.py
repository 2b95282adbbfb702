"""D-Pruner-OBS (ours, beyond the paper): D-Pruner's dual-importance choice of weights, then SparseGPT's
layer-wise OBS compensation on a Hessian of general (C4) plus domain calibration text.

Why: D-Pruner masks the original weights without any update, and most of its general-perplexity loss
against SparseGPT comes from that (the general-importance-only mask is far behind SparseGPT, which
ranks by the same saliency but compensates). Two ways to combine them:
  selection="mask"      the dual-importance mask (one threshold per matrix, as stage 3) is fixed, and
                        the OBS sweep only pushes each pruned weight's error onto the kept columns;
  selection="saliency"  the dual importance replaces w^2/[H^-1]_jj as the ranking inside each column
                        block of SparseGPT's sweep (the sweep's compensated weights are what is ranked
                        against, block by block, as in SparseGPT);
  selection="blend"     (ours) the ranking inside each block is the weighted geometric mean
                        (w^2/[H^-1]_jj)^(1 - blend) * dual^blend: blend = 0 is MixCal, blend = 1 is
                        `saliency`, and blend is chosen on validation text between the two.
The Hessian is MixCal's blend H = alpha H_general + (1 - alpha) H_domain (each set normalised by its own
window count), so alpha = 1 compensates on C4 only.
"""

from __future__ import annotations

import os

import torch

from dpruner.errors import DPrunerError
from dpruner.masks import select
from dpruner.methods.base import LayerOutcome, LayerStats, register
from dpruner.methods.dpruner import DPrunerScores
from dpruner.methods.mixcal import MixCal
from dpruner.obs import obs_prune

SELECTIONS = ("mask", "saliency", "blend")
# Ours, chosen on validation text of both domains (docs/RESULTS.md 10e): the even geometric mean of the
# OBS saliency and the dual importance beat mask, saliency and b = 0.25 / 0.75 on every validation text.
DEFAULT_SELECTION = "blend"
DEFAULT_BLEND = 0.5


@register
class DPrunerOBS(MixCal):
    name = "dpruner-obs"

    def __init__(self, sparsity: float, scores: str | os.PathLike, selection: str = DEFAULT_SELECTION,
                 blend: float | None = None, **options) -> None:
        if selection not in SELECTIONS:
            raise DPrunerError(f"--selection {selection!r} is not one of {', '.join(SELECTIONS)}")
        if blend is not None and selection != "blend":
            raise DPrunerError(f"--blend only applies to --selection blend, not {selection}")
        blend = {"blend": DEFAULT_BLEND if blend is None else blend, "saliency": 1.0}.get(selection, 0.0)
        if not 0.0 <= blend <= 1.0:  # NaN fails this too
            raise DPrunerError(f"--blend must be in [0, 1], got {blend}")
        super().__init__(sparsity, **options)
        self.selection = selection
        self.blend = blend
        self.dual = DPrunerScores(sparsity, scores, pattern=self.pattern)

    @property
    def score_set(self):
        return self.dual.score_set

    def settings(self) -> dict:
        blend = {"blend": self.blend} if self.selection == "blend" else {}
        return super().settings() | {"selection": self.selection, **blend, "scores": str(self.score_set.folder),
                                     "scores_kind": self.score_set.manifest.get("kind")}

    def group_widths(self, in_features: int) -> tuple[int, ...]:
        """`mask` ranks whole matrices (as stage 3), `saliency` and `blend` within SparseGPT's column blocks."""
        return (in_features,) if self.selection == "mask" else super().group_widths(in_features)

    def prune(self, layer: int, module_name: str, weight: torch.Tensor,
              stats: dict[str, LayerStats] | None) -> LayerOutcome:
        importance = self.dual.scores(layer, module_name, weight, None).float()
        if self.selection == "blend" and bool((importance < 0).any()):
            raise DPrunerError(f"--selection blend takes the log of the scores, but layer {layer} {module_name} of "
                               f"{self.score_set.folder} has negative ones; use --selection mask or saliency")
        hessian = self.hessian(stats)
        sparsity = self.sparsity_at(layer)
        if self.selection == "mask":
            mask = select(importance, sparsity, scope="matrix", pattern=self.pattern)
            result = obs_prune(weight, hessian, sparsity, blocksize=self.blocksize, percdamp=self.percdamp,
                               fixed_mask=mask)
        else:
            result = obs_prune(weight, hessian, sparsity, blocksize=self.blocksize, percdamp=self.percdamp,
                               n_m=self.n_m, selection_scores=importance, blend=self.blend)
        return LayerOutcome(scores=importance, weight=result.weight, mask=result.mask, loss=result.loss)

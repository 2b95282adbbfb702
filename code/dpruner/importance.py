"""D-Pruner's dual importance: the general-importance regularizer and the per-weight score.

Called from the LOMO hook for every parameter; acts on the 7 projections of every decoder layer.

Paper form (default). Loss L = L_NTP + lambda * sum G (W' - W)^2 with the one-step W' - W = -eta g;
its gradient is approximated, as in the method, by 2 lambda eta^2 G g^2 and added to g inside the hook
(no second backward). The refined g then scores each weight, every step, with the second-order
Taylor term using the empirical Fisher g^2 as the Hessian diagonal: I += |g w + (g w)^2 / 2|.

Upstream form (to reproduce the original numbers). The added term is 2 lambda eta^2 G (S g)^2 / 1000
on the loss-scaled gradient S g, and eta is the learning rate the original's optimizer held at that
moment (the previous step's in the norm pass); the score is |S g w + (S g w)^2 / 2000 + w^3|, summed only
in the norm pass of two-pass clipping and only from the second step on (the `is_update` flag timing).

Anchor form (ours, optional). The exact gradient of lambda * sum G (W - W0)^2 against the pretrained
weights W0: 2 lambda G (W - W0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.io import ScoreSet
from dpruner.lomo import GradContext, Phase
from dpruner.models import PROJECTIONS

_TARGET = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(p) for p in PROJECTIONS) + r")\.weight$")


def projection_target(param_name: str) -> tuple[int, str] | None:
    """(layer, module) for `model.layers.3.self_attn.q_proj.weight`, else None."""
    match = _TARGET.search(param_name)
    return (int(match.group(1)), match.group(2)) if match else None


def full_shape(param: nn.Parameter) -> torch.Size:
    """The unpartitioned shape, also for a ZeRO-3 parameter."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


@dataclass
class ImportanceSettings:
    regularizer: str = "paper"  # paper | upstream | anchor | none
    regularizer_lambda: float = 0.1
    formula: str = "paper"  # paper | upstream
    accumulate: str = "every_step"  # every_step | upstream
    upstream_regularizer_divisor: float = 1000.0
    upstream_importance_divisor: float = 2000.0

    @classmethod
    def from_config(cls, config) -> ImportanceSettings:
        return cls(config.regularizer, config.regularizer_lambda, config.importance_formula,
                   config.importance_accumulate, config.upstream_regularizer_divisor,
                   config.upstream_importance_divisor)


def load_general_importance(folder: str, named_params: dict[str, nn.Parameter], dtype: torch.dtype = torch.bfloat16,
                            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Stage-1 scores G keyed by parameter name, checked against the model (layers, shapes, finiteness)."""
    scores = ScoreSet.open(folder)
    targets = {name: projection_target(name) for name in named_params}
    layers = {t[0] for t in targets.values() if t}
    if scores.num_layers != len(layers):
        raise DPrunerError(f"general importance {folder}: {scores.num_layers} layers, the model has {len(layers)}")
    general: dict[str, torch.Tensor] = {}
    for index in sorted(layers):
        tensors = scores.layer(index)
        for name, target in targets.items():
            if not target or target[0] != index:
                continue
            module = target[1]
            if module not in tensors:
                raise DPrunerError(f"general importance {folder}: layer {index} lacks {module}")
            G = tensors[module]
            expected = full_shape(named_params[name])
            if tuple(G.shape) != tuple(expected):
                raise DPrunerError(f"general importance {folder}: layer {index} {module} has shape {list(G.shape)}, "
                                   f"the model's weight is {list(expected)}")
            if not torch.isfinite(G).all():
                raise DPrunerError(f"general importance {folder}: layer {index} {module} holds NaN or inf")
            general[name] = G.to(dtype=dtype, device=device)
    return general


class DualImportance:
    """The gradient callback for Lomo: refines projection gradients and accumulates I per weight."""

    def __init__(self, settings: ImportanceSettings, named_params: dict[str, nn.Parameter],
                 general: dict[str, torch.Tensor] | None, anchors: dict[str, torch.Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.targets = {name: t for name in named_params if (t := projection_target(name))}
        if settings.regularizer != "none" and not general:
            raise DPrunerError(f"regularizer {settings.regularizer!r} needs the general importance")
        if settings.regularizer == "anchor" and not anchors:
            raise ValueError("the anchor regularizer needs the pretrained weights W0")
        self.general = general or {}
        self.anchors = anchors or {}
        self.scores = {name: torch.zeros(full_shape(named_params[name]), dtype=torch.float32, device=device)
                       for name in self.targets}
        self.steps_accumulated: set[int] = set()

    def _should_accumulate(self, ctx: GradContext) -> bool:
        if self.settings.accumulate == "upstream":
            return ctx.phase is Phase.NORM and ctx.previous_step_updated
        return ctx.phase is Phase.UPDATE

    @torch.no_grad()
    def __call__(self, name: str, param: nn.Parameter, g: torch.Tensor, ctx: GradContext) -> torch.Tensor:
        if name not in self.targets:
            return g
        s = self.settings
        w = param.data if param.dtype == torch.float32 else param.data.float()
        if s.regularizer == "paper":
            g.addcmul_(self.general[name], g * g, value=2 * s.regularizer_lambda * ctx.lr ** 2)
        elif s.regularizer == "upstream":
            eta = ctx.stale_lr if ctx.phase is Phase.NORM else ctx.lr
            coef = 2 * s.regularizer_lambda * eta ** 2 * ctx.loss_scale / s.upstream_regularizer_divisor
            g.addcmul_(self.general[name], g * g, value=coef)
        elif s.regularizer == "anchor":
            g.addcmul_(self.general[name], w - self.anchors[name], value=2 * s.regularizer_lambda)
        if self._should_accumulate(ctx):
            self.steps_accumulated.add(ctx.step)
            gw = g * w
            if s.formula == "upstream":
                gw.mul_(ctx.loss_scale)
                term = gw * gw
                term.div_(s.upstream_importance_divisor).add_(gw).add_(w * w * w)
            else:
                term = gw * gw
                term.mul_(0.5).add_(gw)
            self.scores[name].add_(term.abs_())
        return g

    def layer_scores(self, num_layers: int) -> list[dict[str, torch.Tensor]]:
        """Accumulated scores grouped per decoder layer, keyed by module name."""
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        for name, (index, module) in self.targets.items():
            layers[index][module] = self.scores[name]
        return layers

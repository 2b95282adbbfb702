"""D-Pruner's dual importance: the general-importance regularizer and the per-weight score.

Called from the LOMO hook for every parameter; acts on the 7 projections of every decoder layer. The
paper's loss is L = L_NTP + lambda * sum G (W' - W)^2. What "W' - W" means decides the gradient, so the
forms below are kept apart (docs/DEVIATIONS.md explains each):

anchor (default). W' the weights being trained, W = W0 the pretrained ones: the exact gradient is
2 lambda G (W - W0). W0 is held in the weights' own dtype, so the term is exactly 0 at step 1. With
`anchor_step: proximal` the SGD step is the implicit one, W' = (W - eta g + 2 eta lambda G W0) /
(1 + 2 eta lambda G): stable for any G (the explicit step overshoots where G > 1/(eta lambda)).

grad_penalty. W' - W = -eta g (one SGD step), so the penalty is lambda eta^2 sum G g^2; its exact
gradient 2 lambda eta^2 H (G g) needs a Hessian-vector product. The trainer adds the penalty, built with
its graph, to the loss (`gradient_penalty`); the hooks then receive the exact gradient. It keeps every
projection gradient alive with its graph, so it does not have LOMO's memory profile.

squared_grad (the form this project called "paper" before). Adds 2 lambda eta^2 G g^2 to g. It is not
the gradient of either reading above (it is >= 0 whatever the sign of g); kept to compare with.

upstream (reproduces the original numbers). The added term is 2 lambda eta^2 G (S g)^2 / 1000 on the
loss-scaled gradient S g, and eta is the learning rate the original's optimizer held at that moment
(the previous step's in the norm pass); the score is |S g w + (S g w)^2 / 2000 + w^3|, summed only in the
norm pass of two-pass clipping and only from the second step on (the `is_update` flag timing).

The refined g then scores each weight (paper formula), with the empirical Fisher g^2 as the Hessian
diagonal: I += |g w + (g w)^2 / 2|.

Under ZeRO-3 each rank holds G, W0 and the scores only for its own slice of every weight (the slice of
its `ds_tensor`, see lomo.local_range): the hook hands this callback that slice of the gradient, every
operation here is elementwise, and the scores are gathered to rank 0 matrix by matrix at save.
`importance_offload: cpu` keeps them in (pinned, when CUDA exists) CPU memory; the hook moves each
matrix's G and W0 to the gradient's device and the score term back.

G's raw scale depends on the calibration (H = 2/n_seq sum over tokens of x x^T grows with tokens per
sequence), the layer and the model. `general_importance_norm: matrix_mean` divides each matrix's G by
its mean, so lambda means the same at any seqlen, nsamples, layer or model; `upstream` keeps raw G.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.io import ScoreSet
from dpruner.lomo import GradContext, Phase, local_part, local_range, local_weight
from dpruner.models import PROJECTIONS

_TARGET = re.compile(r"(?:^|\.)layers\.(\d+)\.(" + "|".join(re.escape(p) for p in PROJECTIONS) + r")\.weight$")


def projection_target(param_name: str) -> tuple[int, str] | None:
    """(layer, module) for `model.layers.3.self_attn.q_proj.weight`, else None."""
    match = _TARGET.search(param_name)
    return (int(match.group(1)), match.group(2)) if match else None


def full_shape(param: nn.Parameter) -> torch.Size:
    """The unpartitioned shape, also for a ZeRO-3 parameter."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


REGULARIZERS = ("anchor", "grad_penalty", "squared_grad", "upstream", "none")
# Old names that now mean something else: refused with the new name rather than silently mapped.
RENAMED_REGULARIZERS = {"paper": "squared_grad"}
GENERAL_NORMS = ("auto", "matrix_mean", "none")
ANCHOR_STEPS = ("proximal", "explicit")
# lambda when the config leaves it null. The original lomo.py hard-codes 0.1 (on raw G); the forms that
# reproduce or follow the original keep it. `anchor`'s 100 (on G normalised per matrix) is ours, chosen
# on validation text of both shipped domains (docs/RESULTS.md sections 10b and 10d).
DEFAULT_LAMBDAS = {"anchor": 100.0, "grad_penalty": 0.1, "squared_grad": 0.1, "upstream": 0.1, "none": 0.0}
# The forms whose term the hook adds (grad_penalty's is in the loss; none has none).
HOOK_TERMS = ("anchor", "squared_grad", "upstream")
# grad_penalty differentiates the backward: torch's fused SDPA kernels have no double backward on CPU.
DOUBLE_BACKWARD_ATTENTION = "eager"


@dataclass
class ImportanceSettings:
    regularizer: str = "anchor"  # one of REGULARIZERS
    regularizer_lambda: float = DEFAULT_LAMBDAS["anchor"]
    formula: str = "paper"  # paper | upstream
    accumulate: str = "every_step"  # every_step | upstream
    upstream_regularizer_divisor: float = 1000.0
    upstream_importance_divisor: float = 2000.0
    anchor_step: str = "proximal"  # proximal | explicit

    @classmethod
    def from_config(cls, config) -> ImportanceSettings:
        return cls(config.regularizer, config.regularizer_lambda, config.importance_formula,
                   config.importance_accumulate, config.upstream_regularizer_divisor,
                   config.upstream_importance_divisor, config.anchor_step)


def resolve_general_norm(norm: str, regularizer: str) -> str:
    """`auto`: raw G for `upstream` (the original's numbers), per-matrix mean 1 for every other form."""
    if norm != "auto":
        return norm
    return "none" if regularizer == "upstream" else "matrix_mean"


def normalize_general(G: torch.Tensor, norm: str) -> torch.Tensor:
    """G scaled to mean 1 over its matrix (`matrix_mean`), in fp32; an all-zero G stays zero."""
    if norm == "none":
        return G
    G = G.float()
    mean = G.mean()
    return G / mean if mean > 0 else G


def load_general_importance(folder: str, named_params: dict[str, nn.Parameter], dtype: torch.dtype = torch.bfloat16,
                            device: torch.device | str = "cpu", norm: str = "none") -> dict[str, torch.Tensor]:
    """Stage-1 scores G keyed by parameter name, checked against the model (layers, shapes, finiteness),
    normalised per matrix as `norm` says before the cast to `dtype`; under ZeRO-3 this rank's slice only."""
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
            general[name] = local_part(named_params[name], normalize_general(G, norm)).to(dtype=dtype, device=device)
    return general


def pretrained_anchors(folder: str | Path, named_params: dict[str, nn.Parameter],
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """W0 for the anchor form: the checkpoint's projection weights cast to each parameter's own dtype,
    exactly as from_pretrained casts them, so W - W0 is exactly 0 before the first update (under ZeRO-3
    this rank's slice only)."""
    from safetensors import safe_open

    folder = Path(folder)
    anchors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in named_params and projection_target(key):
                    W0 = local_part(named_params[key], handle.get_tensor(key))
                    anchors[key] = W0.to(dtype=named_params[key].dtype, device=device)
    missing = [n for n in named_params if projection_target(n) and n not in anchors]
    if missing:
        raise DPrunerError(f"regularizer anchor: pretrained weights for {missing[0]} not found in {folder}")
    return anchors


class DualImportance:
    """The gradient callback for Lomo: refines projection gradients and accumulates I per weight."""

    def __init__(self, settings: ImportanceSettings, named_params: dict[str, nn.Parameter],
                 general: dict[str, torch.Tensor] | None, anchors: dict[str, torch.Tensor] | None = None,
                 device: torch.device | str = "cpu", pin: bool = False) -> None:
        self.settings = settings
        self.targets = {name: t for name in named_params if (t := projection_target(name))}
        if settings.regularizer not in REGULARIZERS:
            raise DPrunerError(f"regularizer {settings.regularizer!r}; expected one of {', '.join(REGULARIZERS)}")
        if settings.regularizer != "none" and not general:
            raise DPrunerError(f"regularizer {settings.regularizer!r} needs the general importance")
        if settings.regularizer == "anchor" and not anchors:
            raise ValueError("the anchor regularizer needs the pretrained weights W0")
        self.params = {name: named_params[name] for name in self.targets}
        self.scores = {name: torch.zeros(local_shape(param), dtype=torch.float32, device=device)
                       for name, param in self.params.items()}
        self.general, self.anchors = general or {}, anchors or {}
        if pin and torch.cuda.is_available():  # page-locked for fast copies; CPU-only torch cannot pin
            for held in (self.general, self.anchors, self.scores):
                held.update({name: t.pin_memory() for name, t in held.items()})
        self.steps_accumulated: set[int] = set()

    def _should_accumulate(self, ctx: GradContext) -> bool:
        if self.settings.accumulate == "upstream":
            return ctx.phase is Phase.NORM and ctx.previous_step_updated
        return ctx.phase is Phase.UPDATE

    def gradient_penalty(self, loss: torch.Tensor, lr: float, named_params: dict[str, nn.Parameter]) -> torch.Tensor:
        """lambda eta^2 sum G g^2 over the projections, with its graph (the `grad_penalty` form). Added to
        the loss, one backward gives the hooks its exact gradient (a Hessian-vector product)."""
        names = list(self.targets)
        grads = torch.autograd.grad(loss, [named_params[n] for n in names], create_graph=True)
        total = sum((self.general[n].to(g.dtype) * g.square()).sum() for n, g in zip(names, grads))
        return self.settings.regularizer_lambda * lr ** 2 * total

    @torch.no_grad()
    def __call__(self, name: str, param: nn.Parameter, g: torch.Tensor, ctx: GradContext) -> torch.Tensor:
        """Refine g in place (the exact gradient of the regularized loss, which is what is scored) and
        return what SGD applies: g itself, or for the proximal anchor step g / (1 + 2 eta lambda G)."""
        if name not in self.targets:
            return g
        s = self.settings
        w = local_weight(param)
        w = w if w.dtype == torch.float32 else w.float()
        G = self.general[name].to(g.device, non_blocking=True) if s.regularizer in HOOK_TERMS else None
        step_grad = g
        if s.regularizer == "squared_grad":
            g.addcmul_(G, g * g, value=2 * s.regularizer_lambda * ctx.lr ** 2)
        elif s.regularizer == "upstream":
            eta = ctx.stale_lr if ctx.phase is Phase.NORM else ctx.lr
            coef = 2 * s.regularizer_lambda * eta ** 2 * ctx.loss_scale / s.upstream_regularizer_divisor
            g.addcmul_(G, g * g, value=coef)
        elif s.regularizer == "anchor":
            g.addcmul_(G, w - self.anchors[name].to(g.device, non_blocking=True), value=2 * s.regularizer_lambda)
            if s.anchor_step == "proximal":
                step_grad = g / (1 + (2 * ctx.lr * s.regularizer_lambda) * G.float())
        # grad_penalty: nothing to add here; the penalty is part of the loss (gradient_penalty).
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
            score = self.scores[name]
            score.add_(term.abs_().to(score.device))
        return step_grad

    def bytes_held(self) -> int:
        """Bytes of G, W0 and the scores on this rank (what partitioning divides by the world size)."""
        return sum(t.numel() * t.element_size() for held in (self.general, self.anchors, self.scores)
                   for t in held.values())

    def layer_scores(self, num_layers: int) -> list[dict[str, torch.Tensor]] | None:
        """Accumulated scores grouped per decoder layer, keyed by module name, in full shape. Under ZeRO-3
        every rank must call it: the slices are gathered to rank 0 one matrix at a time (on the CPU), and
        the other ranks get None."""
        layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        for name, (index, module) in self.targets.items():
            layers[index][module] = self._gathered(name)
        return None if dist.is_initialized() and dist.get_rank() != 0 else layers

    def _gathered(self, name: str) -> torch.Tensor | None:
        param, score = self.params[name], self.scores[name]
        if local_range(param) is None:
            return score
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return score.view(full_shape(param))
        # Equal-sized pieces (the last rank's padded), on the parameter's device for NCCL.
        piece = torch.zeros(param.ds_tensor.numel(), dtype=score.dtype, device=param.device)
        piece[:score.numel()] = score
        pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
        dist.gather(piece, pieces, dst=0)
        if pieces is None:
            return None
        return torch.cat([p.cpu() for p in pieces])[:param.ds_numel].view(full_shape(param))


def local_shape(param: nn.Parameter) -> torch.Size:
    """The shape of what this rank holds per weight: its flat slice under ZeRO-3, else the whole weight."""
    part = local_range(param)
    return full_shape(param) if part is None else torch.Size([part.stop - part.start])

"""LOMO: full-parameter SGD fused into the backward pass (Lv et al., 2023).

Every trainable parameter gets a post-accumulate-grad hook: as soon as its gradient exists the hook
(optionally) all-reduces it, lets a gradient callback refine it (D-Pruner's regularizer and importance
live there), and either adds its squared norm (norm pass) or applies the SGD update (update pass); then
it frees the gradient. At most one parameter's gradient is alive at a time and there is no optimizer
state. Global-norm clipping needs the norm before any update, hence the original's two passes: a
backward that only measures, then a second forward+backward that updates with the clip coefficient.

Under DeepSpeed ZeRO-3 the parameter is gathered when the hook fires (full weight and gradient). After
the all-reduce each rank keeps only its own slice of the flattened gradient, the one its flat partition
`param.ds_tensor` holds: the callback refines that slice, the norm pass sums the slices' squares (one
scalar all-reduce per pass: every element counted once) and the update writes it into `ds_tensor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist
from torch import nn

# Clipping epsilon of the original LOMO (and of torch.nn.utils.clip_grad_norm_).
CLIP_EPS = 1e-6


class Phase(Enum):
    NORM = "norm"  # first pass of two-pass clipping: measure only
    UPDATE = "update"  # the pass that applies SGD


@dataclass
class GradContext:
    """What a gradient callback may need to know about the pass it runs in."""

    phase: Phase
    step: int  # optimizer step, 1-based
    lr: float  # learning rate of this step
    stale_lr: float  # the original's `self.lr` during this pass: the previous update's lr in the norm pass
    loss_scale: float  # S: the fp16 loss scale, or the emulated constant (1 when neither)
    previous_step_updated: bool  # the original's `is_update` flag at the start of this step


GradCallback = Callable[[str, nn.Parameter, torch.Tensor, GradContext], torch.Tensor]


class DynamicLossScaler:
    """fp16 loss scaling as the original: start at 2^16, halve on overflow (not below 1), never grow."""

    def __init__(self, initial: float = 65536.0) -> None:
        self.scale = float(initial)

    def on_overflow(self) -> None:
        self.scale = max(self.scale / 2.0, 1.0)


def is_partitioned(param: nn.Parameter) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its real storage is the flat `ds_tensor` partition)."""
    return hasattr(param, "ds_tensor")


def local_range(param: nn.Parameter) -> slice | None:
    """This rank's range of the flattened full weight under ZeRO-3, the padding of the last partition
    left out (so the ranks' ranges tile the weight exactly); None for a parameter that is not partitioned."""
    if not is_partitioned(param):
        return None
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    size = param.ds_tensor.numel()
    start = min(rank * size, param.ds_numel)
    return slice(start, min(start + size, param.ds_numel))


def local_part(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """`full` (shaped like the whole weight) cut to this rank's flat range, a copy so the rest can be freed;
    `full` itself when the parameter is not partitioned."""
    part = local_range(param)
    return full if part is None else full.reshape(-1)[part].clone()


def local_weight(param: nn.Parameter) -> torch.Tensor:
    """The weights this rank updates: its `ds_tensor` slice (flat, padding left out) or the whole tensor."""
    part = local_range(param)
    return param.data if part is None else param.ds_tensor.data[:part.stop - part.start]


class Lomo:
    """Fused SGD over `named_params`. Call `norm_pass` (when clipping) then `update_pass` each step."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 weight_decay: float = 0.0, loss_scaler: DynamicLossScaler | None = None,
                 emulated_loss_scale: float | None = None, grad_callback: GradCallback | None = None) -> None:
        self.params = [(name, p) for name, p in named_params if p.requires_grad]
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.weight_decay = weight_decay
        self.loss_scaler = loss_scaler
        self.emulated_loss_scale = emulated_loss_scale
        self.grad_callback = grad_callback
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.step = 0
        self.last_update_lr = lr  # the original initialises its `self.lr` with the peak learning rate
        self.previous_step_updated = False
        self._ctx: GradContext | None = None
        self._clip_coef = 1.0
        self._sq_norm = 0.0  # from whole gradients (the same on every rank)
        self._sq_norm_local = 0.0  # from this rank's slices of partitioned gradients
        self._overflow = False
        self.last_norm: float | None = None  # global gradient norm of the last norm pass
        self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(name)) for name, p in self.params]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def loss_scale(self) -> float:
        """The factor the loss is multiplied by before backward (fp16 only)."""
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    def _formula_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else (self.emulated_loss_scale or 1.0)

    def _make_hook(self, name: str):
        def hook(param: nn.Parameter) -> None:
            grad = param.grad
            param.grad = None
            if grad is None or self._ctx is None:
                return
            if self.world_size > 1:
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
                grad.div_(self.world_size)
            if self.loss_scaler is not None:
                if self._overflow or not torch.isfinite(grad).all():
                    self._overflow = True
                    return
            g = grad.float() if grad.dtype != torch.float32 else grad
            if self.loss_scale != 1.0:
                g.div_(self.loss_scale)
            part = local_range(param)
            if part is not None:
                g = g.reshape(-1)[part]
            if self.grad_callback is not None:
                g = self.grad_callback(name, param, g, self._ctx)
            if self._ctx.phase is Phase.NORM:
                square = float(torch.linalg.vector_norm(g)) ** 2
                if part is None:
                    self._sq_norm += square
                else:
                    self._sq_norm_local += square
            else:
                self._apply(param, g)

        return hook

    @torch.no_grad()
    def _apply(self, param: nn.Parameter, g: torch.Tensor) -> None:
        lr = self._ctx.lr
        if self.clip_grad_value is not None:
            g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self._clip_coef != 1.0:
            g.mul_(self._clip_coef)
        target = local_weight(param)
        if self.weight_decay:
            g.add_(target.float(), alpha=self.weight_decay)
        if is_partitioned(param):
            if target.numel():
                target.copy_((target.float() - lr * g).to(target.dtype))
            return
        if param.dtype == torch.float32:
            param.data.add_(g, alpha=-lr)
        else:
            param.data.copy_((param.data.float() - lr * g).to(param.dtype))

    def _backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale).backward() if self.loss_scale != 1.0 else loss.backward()

    def norm_pass(self, loss: torch.Tensor, lr: float) -> bool:
        """Measure the global gradient norm; False when an fp16 overflow makes the step skip."""
        self.step += 1
        self._ctx = GradContext(Phase.NORM, self.step, lr, self.last_update_lr, self._formula_scale(),
                                self.previous_step_updated)
        self._sq_norm, self._sq_norm_local, self._overflow = 0.0, 0.0, False
        self._backward(loss)
        self._ctx = None
        if self._overflow:
            self.loss_scaler.on_overflow()
            self.previous_step_updated = False
            return False
        total = math.sqrt(self._sq_norm + self._partitioned_sq_norm())
        self._clip_coef = min(1.0, self.clip_grad_norm / (total + CLIP_EPS)) if self.clip_grad_norm else 1.0
        self.last_norm = total
        return True

    def _partitioned_sq_norm(self) -> float:
        """The sum over ranks of the slices' squared norms (0 when nothing is partitioned)."""
        if self.world_size == 1:
            return self._sq_norm_local
        device = self.params[0][1].device if self.params else torch.device("cpu")  # NCCL reduces GPU tensors only
        total = torch.tensor(self._sq_norm_local, dtype=torch.float64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return float(total)

    def update_pass(self, loss: torch.Tensor, lr: float) -> None:
        """Backward that applies SGD parameter by parameter (after `norm_pass` when clipping)."""
        if not self.clip_grad_norm:
            self.step += 1
            self._clip_coef = 1.0
        self._ctx = GradContext(Phase.UPDATE, self.step, lr, lr, self._formula_scale(), self.previous_step_updated)
        self._overflow = False
        self._backward(loss)
        self._ctx = None
        self.last_update_lr = lr
        self.previous_step_updated = True
        self._clip_coef = 1.0

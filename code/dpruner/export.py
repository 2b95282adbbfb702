"""Save pruned models as plain Hugging Face folders with a sparsity report beside them."""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpruner import __version__
from dpruner.checkpoint import write_checksums
from dpruner.errors import DPrunerError
from dpruner.io import atomic_dir, write_json
from dpruner.models import PROJECTIONS, decoder_layers, projection_modules

REPORT_NAME = "pruning_report.json"


def versions() -> dict[str, Any]:
    """Library versions plus what decides CPU floating-point results bit for bit: the thread count
    (how reductions are split) and the SIMD kernels torch dispatches to (AVX2, AVX-512, ...)."""
    import transformers

    return {"dpruner": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


class SparsityCounter:
    """Zeros per layer and projection, and over all parameters, counted tensor by tensor (so a
    streamed model that is never whole in memory gets the same report). `mask_sha256` hashes which
    projection weights are zero, layer by layer in module order: two runs pruned the same weights
    exactly when their checksums agree (whatever the kept values)."""

    def __init__(self) -> None:
        self.per_layer: list[dict[str, Any]] = []
        self.zeros_proj = self.total_proj = self.zeros_all = self.total_all = 0
        self.mask_digest = hashlib.sha256()

    def add_tensor(self, tensor: torch.Tensor) -> int:
        zeros = tensor.numel() - int(torch.count_nonzero(tensor))
        self.zeros_all += zeros
        self.total_all += tensor.numel()
        return zeros

    def add_layer(self, index: int, projections: Mapping[str, torch.Tensor], others: Iterable[torch.Tensor]) -> None:
        entry: dict[str, Any] = {"layer": index}
        for name, weight in projections.items():
            zeros = self.add_tensor(weight)
            self.mask_digest.update(f"{index}.{name}:{list(weight.shape)}".encode())
            self.mask_digest.update(np.packbits((weight.detach() == 0).cpu().numpy()).tobytes())
            entry[name] = round(zeros / weight.numel(), 6)
            self.zeros_proj += zeros
            self.total_proj += weight.numel()
        for tensor in others:
            self.add_tensor(tensor)
        self.per_layer.append(entry)

    def report(self) -> dict[str, Any]:
        return {
            "projections": list(PROJECTIONS),
            "projection_sparsity": self.zeros_proj / self.total_proj,
            "overall_sparsity": self.zeros_all / self.total_all,
            "projection_weights": self.total_proj,
            "all_parameters": self.total_all,
            "zero_projection_weights": self.zeros_proj,
            "zero_parameters": self.zeros_all,
            "per_layer": self.per_layer,
            "mask_sha256": self.mask_digest.hexdigest(),
        }


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Zeros per layer and projection, over the pruned matrices and over all (unique) parameters."""
    counter = SparsityCounter()
    seen: set[int] = set()
    for index, layer in enumerate(decoder_layers(model)):
        projections = {name: linear.weight for name, linear in projection_modules(layer).items()}
        weights = {id(w) for w in projections.values()}
        counter.add_layer(index, projections, [p for p in layer.parameters() if id(p) not in weights])
        seen.update(id(p) for p in layer.parameters())
    for param in {id(p): p for p in model.parameters()}.values():
        if id(param) not in seen:
            counter.add_tensor(param)
    return counter.report()


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

"""Orchestration shared by the pruning CLIs: validate, build calibration, run the driver, save.

Order matters for "nothing half-written": every check that can fail cheaply (arguments, model
structure, output conflicts, data files) runs before the model weights are loaded or anything is
written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpruner.data.calibration import DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, c4_documents, sample_windows
from dpruner.errors import DPrunerError
from dpruner.export import check_output_dir, save_pruned_model, versions
from dpruner.io import ScoreWriter
from dpruner.layerwise import prune_layerwise
from dpruner.methods.base import PruningMethod
from dpruner.models import PROJECTIONS, check_supported, load_model, load_tokenizer, resolve_device, resolve_model

CALIBRATION_DATASETS = ("c4",)


@dataclass
class CalibrationSpec:
    dataset: str = "c4"
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    windowing: str = "document"
    source: str = "local"
    data_dir: str | None = None

    def validate(self) -> None:
        if self.dataset not in CALIBRATION_DATASETS:
            raise DPrunerError(f"unknown calibration dataset {self.dataset!r}; expected one of {', '.join(CALIBRATION_DATASETS)}")
        if self.nsamples < 1:
            raise DPrunerError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise DPrunerError(f"--seqlen must be >= 2, got {self.seqlen}")


def build_calibration(spec: CalibrationSpec, tokenizer) -> dict[str, torch.Tensor]:
    """Named calibration sets of token windows (one set, `c4`, for stage 1)."""
    spec.validate()
    texts = c4_documents(spec.source, spec.data_dir)
    return {spec.dataset: sample_windows(tokenizer, texts, spec.nsamples, spec.seqlen, spec.seed, spec.windowing)}


def check_model_structure(model_name: str) -> int:
    """Build the model on the meta device (no weights) to check its layout; return its layer count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model(model_name)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise DPrunerError(f"model {model_name!r}: cannot read its config ({str(err).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise DPrunerError(f"model {model_name!r} is not a causal LM ({str(err).splitlines()[0]})") from None
    check_supported(skeleton, model_name)
    return len(skeleton.model.layers)


def prune_with_method(model_name: str, method: PruningMethod, calibration: CalibrationSpec | None, *,
                      scores_out: str | Path | None, save_pruned: str | Path | None, overwrite: bool = False,
                      dtype: str = "auto", device: str | None = None, batch_size: int = 8,
                      true_sequential: bool = False, kind: str = "scores") -> dict[str, Any]:
    """Run `method` layer by layer over `model_name`; write scores and/or the pruned model."""
    if calibration is not None:
        calibration.validate()
    resolve_device(device)
    num_layers = check_model_structure(model_name)
    settings: dict[str, Any] = dict(method.settings(), true_sequential=true_sequential, dtype=dtype)
    if calibration is not None:
        settings["calibration"] = asdict(calibration) | {"data_dir": None}
    writer = (ScoreWriter(scores_out, kind=kind, model=model_name, num_layers=num_layers,
                          modules=list(PROJECTIONS), settings=settings, overwrite=overwrite)
              if scores_out else None)
    if save_pruned:
        check_output_dir(save_pruned, overwrite)
    tokenizer = load_tokenizer(model_name)
    windows = build_calibration(calibration, tokenizer) if calibration is not None else None

    began = time.time()
    target = resolve_device(device)
    model = load_model(model_name, dtype=dtype, device="cpu" if target.type == "cuda" else target)
    summary = prune_layerwise(model, method, windows, batch_size=batch_size, device=target, writer=writer,
                              true_sequential=true_sequential)
    result: dict[str, Any] = {"model": model_name, "settings": settings, "seconds": round(time.time() - began, 2),
                              "this_run": summary.as_dict(), "versions": versions()}
    if writer is not None:
        writer.finish(summary=result)
        result["scores"] = str(writer.folder)
    if save_pruned:
        report = {"method": method.name, "base_model": model_name, "settings": settings,
                  "scores": str(scores_out) if scores_out else None}
        save_pruned_model(model, tokenizer, save_pruned, report)
        result["pruned_model"] = str(save_pruned)
    return result

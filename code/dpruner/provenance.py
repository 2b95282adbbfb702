"""Which model a score folder was computed for: a fingerprint in its manifest, checked by its readers.

Shapes alone cannot tell two models apart (every LLaMA-2-7B fine-tune has the same ones), so the
fingerprint is the sha256 of the model's config plus a checksum of a few of its tensors (the first
rows of the first layer's q_proj, the last layer's down_proj and the final norm). Values are hashed as
fp32, so the same model stored in fp16, bf16 or fp32 has one fingerprint. Stages 2 and 3 refuse scores
whose fingerprint differs from the model they are given, unless `--allow-other-model`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from dpruner.errors import DPrunerError

FINGERPRINT_KEY = "model_fingerprint"
ALLOW_OPTION = "--allow-other-model"
# Config entries that change how a model is stored or run, not which model it is.
_VOLATILE_CONFIG = ("transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache")
_ROWS = 64


def _sampled_tensors(config: dict[str, Any]) -> list[str]:
    last = int(config.get("num_hidden_layers", 1)) - 1
    return ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight"]


def fingerprint(model_name: str) -> dict[str, Any] | None:
    """The fingerprint of a local model folder (None for a hub id, which is not read here)."""
    from safetensors import safe_open

    from dpruner.checkpoint import read_header, weight_files
    from dpruner.guard import model_input

    folder = model_input(model_name)
    if folder is None or not folder.is_dir():
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}
    config_sha = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()
    wanted = _sampled_tensors(config)
    digest = hashlib.sha256()
    used = []
    for path in weight_files(folder):
        present = [name for name in wanted if name in read_header(path)]
        if not present:
            continue
        with safe_open(str(path), framework="pt") as handle:
            for name in present:
                values = handle.get_slice(name)[:_ROWS].to(torch.float32).contiguous()
                digest.update(name.encode() + values.view(torch.uint8).numpy().tobytes())
                used.append(name)
    return {"config_sha256": config_sha, "tensors_sha256": digest.hexdigest(), "tensors": sorted(used)}


def check_same_model(manifest: dict[str, Any], folder: str | Path, model_name: str, allow: bool = False) -> None:
    """Refuse (or, with `allow`, warn about) scores recorded for another model than `model_name`."""
    recorded = manifest.get(FINGERPRINT_KEY)
    current = fingerprint(model_name)
    if recorded is None or current is None:
        if current is not None:
            print(f"warning: {folder} records no model fingerprint (written by an older version or the original "
                  f"code); cannot check that it belongs to {model_name}", file=sys.stderr)
        return
    if recorded == current:
        return
    what = "config" if recorded.get("config_sha256") != current["config_sha256"] else "weights"
    message = (f"{folder} was computed for another model ({manifest.get('model')!r}; its {what} differ from "
               f"{model_name})")
    if not allow:
        raise DPrunerError(f"{message}; pass {ALLOW_OPTION} if that is intended")
    print(f"warning: {message}; used anyway ({ALLOW_OPTION})", file=sys.stderr)

"""Strict model loading: a model is either loaded whole from intact safetensors, or refused in one line.

transformers fills a missing tensor with random initialisation and only warns (a warning our quiet
logging hides), so a checkpoint missing a tensor, or a config with more layers than the weights, would
silently run on a partly random model. Here every weight file's header is read first (truncation,
corruption), its tensors are compared with the model the config describes (missing, unexpected,
mismatched shapes, layer count), the checksums we recorded when we wrote the folder are verified, and
the loader's own report is checked again after loading. Pickled weights are never unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.io import atomic_path, first_line, sha256_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# torch.save / pickle files; unpickling one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Written beside the weights of every model folder we save: {file name: sha256}.
CHECKSUMS = "dpruner-checksums.json"
_MAX_HEADER = 100 << 20
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def pickle_refusal(path: Path, role: str = "model") -> DPrunerError:
    folder = path.parent if path.is_file() else path
    return DPrunerError(
        f"{role} {path} holds pickled weights ({path.name if path.is_file() else 'no safetensors'}); only "
        "safetensors are loaded, because unpickling can run code. Convert it once where you trust the file: "
        f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}', "
        f"use_safetensors=False).save_pretrained('{folder}-safetensors')\"")


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, after checking the file holds every byte it announces."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 0 or length > min(size - 8, _MAX_HEADER):
                raise DPrunerError(f"{path}: truncated or not a safetensors file ({size} bytes, header length "
                                   f"{length}); copy or download it again")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise DPrunerError(f"{path}: cannot be read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DPrunerError(f"{path}: corrupt safetensors header (not valid JSON); copy or download it again") from None
    if not isinstance(header, dict):
        raise DPrunerError(f"{path}: corrupt safetensors header (not a table of tensors)")
    header.pop("__metadata__", None)
    end = 0
    for key, entry in header.items():
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            [int(v) for v in entry["shape"]]
            str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise DPrunerError(f"{path}: corrupt safetensors header entry for tensor {key}") from None
        if not 0 <= begin <= stop:
            raise DPrunerError(f"{path}: corrupt safetensors header entry for tensor {key} (offsets {begin}..{stop})")
        end = max(end, stop)
    if 8 + length + end != size:
        raise DPrunerError(f"{path}: truncated or padded ({size} bytes; its header announces {8 + length + end}); "
                           "copy or download it again")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a model folder loads from; pickled or absent weights are refused."""
    if (folder / INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DPrunerError(f"{folder / INDEX}: not a valid safetensors index (expected a weight_map)") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise DPrunerError(f"{folder / INDEX} lists {missing[0]}, which is missing from {folder}")
        return [folder / name for name in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise pickle_refusal(pickled[0])
    raise DPrunerError(f"model folder {folder} holds no weights (expected {SINGLE} or {INDEX})")


def expected_tensors(skeleton: nn.Module) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """Shapes the checkpoint must provide, and the groups of names sharing one tensor (tied weights:
    any one name of a group is enough)."""
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    groups: dict[int, set[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return shapes, [g for g in groups.values() if len(g) > 1]


def _ignored(skeleton: nn.Module, key: str) -> bool:
    patterns = getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or []
    return key.endswith("rotary_emb.inv_freq") or any(re.search(p, key) for p in patterns)


def _layer_count_error(folder: Path, skeleton: nn.Module, present: set[str]) -> DPrunerError | None:
    configured = getattr(skeleton.config, "num_hidden_layers", None)
    held = {int(m[1]) for key in present if (m := _LAYER_KEY.match(key))}
    if configured is not None and held and len(held) != configured:
        return DPrunerError(f"model {folder}: config.json says num_hidden_layers={configured} but the weights hold "
                            f"{len(held)} decoder layers; the config and the weights do not belong together")
    return None


def verify_structure(folder: Path, skeleton: nn.Module) -> None:
    """Every tensor the model needs is in the weight files with its shape, and nothing else is."""
    shapes, tied = expected_tensors(skeleton)
    present: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in weight_files(folder):
        for key, entry in read_header(path).items():
            present[key] = (path, tuple(int(v) for v in entry["shape"]))
    layer_error = _layer_count_error(folder, skeleton, set(present))
    if layer_error:
        raise layer_error
    for key, shape in shapes.items():
        if key in present:
            path, got = present[key]
            if got != shape:
                raise DPrunerError(f"{path}: tensor {key} has shape {list(got)}, "
                                   f"the model's config needs {list(shape)}")
            continue
        group = next((g for g in tied if key in g), {key})
        if not any(name in present for name in group):
            raise DPrunerError(f"model {folder}: tensor {key} is missing from its weights "
                               f"({', '.join(p.name for p in weight_files(folder))}); it would be randomly "
                               "initialised, so the model is refused")
    unexpected = sorted(k for k in present if k not in shapes and not _ignored(skeleton, k))
    if unexpected:
        raise DPrunerError(f"{present[unexpected[0]][0]}: tensor {unexpected[0]} is not part of the model its "
                           f"config describes ({len(unexpected)} such tensors)")


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every weight file of a folder we wrote (verified when it is loaded)."""
    sums = {path.name: sha256_file(path) for path in sorted(folder.glob("*.safetensors"))}
    with atomic_path(folder / CHECKSUMS) as tmp:
        tmp.write_text(json.dumps(sums, indent=2) + "\n", encoding="utf-8")


def verify_checksums(folder: Path) -> None:
    path = folder / CHECKSUMS
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
        items = list(sums.items())
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise DPrunerError(f"{path}: not a valid checksum file") from None
    for name, digest in items:
        file = folder / name
        if not file.is_file():
            raise DPrunerError(f"{file}: listed in {CHECKSUMS} but missing")
        if sha256_file(file) != digest:
            raise DPrunerError(f"{file}: sha256 differs from the one recorded when it was written ({CHECKSUMS}); "
                               "the file is corrupted")


def skeleton_of(folder: str | Path) -> nn.Module:
    """The model the folder's config describes, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise DPrunerError(f"model {folder}: cannot read its config ({first_line(err)})") from None
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise DPrunerError(f"model {folder} is not a causal LM ({first_line(err)})") from None


def verify_model_folder(folder: str | Path, skeleton: nn.Module | None = None, checksums: bool = True) -> None:
    """All checks of a local model folder that need no weights in memory."""
    folder = Path(folder)
    verify_structure(folder, skeleton if skeleton is not None else skeleton_of(folder))
    if checksums:
        verify_checksums(folder)


def load_causal_lm(source: str, name: str, verify: bool = True, **kwargs: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` that refuses instead of initialising anything randomly.
    `verify=False` when the caller ran `verify_model_folder` itself (stage 2 must, before ZeRO-3's
    zero.Init context, which would try to partition the meta skeleton the check builds)."""
    from transformers import AutoModelForCausalLM

    if verify and Path(source).is_dir():
        verify_model_folder(source)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except OSError as err:
        raise DPrunerError(f"model {name!r} is not a local folder and could not be loaded from the Hugging Face "
                           f"hub ({first_line(err)})") from None
    except (ValueError, RuntimeError) as err:  # unknown architecture, size mismatch
        raise DPrunerError(f"model {name!r} cannot be loaded as a causal LM ({first_line(err)})") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        problems = sorted(map(str, info.get(kind) or []))
        if kind == "unexpected_keys":
            problems = [key for key in problems if not _ignored(model, key)]
        if problems:
            raise DPrunerError(f"model {name!r}: {kind.replace('_', ' ')} while loading: {problems[0]}"
                               f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}; refusing a "
                               "partly initialised model")
    return model

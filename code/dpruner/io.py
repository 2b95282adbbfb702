"""Atomic file writes and per-layer score folders (ours and the original code's `.pt` layout).

A score folder holds one safetensors file per decoder layer (keys are module names such as
`self_attn.q_proj`, values fp32 tensors shaped like the weight) and `manifest.json`. The manifest is
rewritten after every layer, so an interrupted run knows which layers are complete and resumes there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpruner import __version__
from dpruner.errors import DPrunerError
from dpruner.provenance import FINGERPRINT_KEY

SCORE_FORMAT = "dpruner-scores/1"
# Manifest key: {layer file name: sha256}; a file that no longer matches is refused, never used.
CHECKSUM_KEY = "sha256"
MANIFEST = "manifest.json"
RESUME_DIR = "_resume"

# The original code's folder names for the 7 projections (stage 2 writes <Proj>/<layer>.pt).
UPSTREAM_DUAL_DIRS = {
    "Q": "self_attn.q_proj",
    "K": "self_attn.k_proj",
    "V": "self_attn.v_proj",
    "O": "self_attn.o_proj",
    "Gate": "mlp.gate_proj",
    "Up": "mlp.up_proj",
    "Down": "mlp.down_proj",
}
# Stage 1 of the original writes general_importance/<q_proj|...>/<layer>.pt.
UPSTREAM_GENERAL_DIRS = {name.split(".")[1]: name for name in UPSTREAM_DUAL_DIRS.values()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the result the modes a plain write would."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# Temporary names say what they are and which process made them: `.<target>.dpruner-tmp-<pid>-<rand>.tmp`.
# A temp whose process is gone was left by a killed run; the next write of the same target removes it.
TEMP_MARK = ".dpruner-tmp-"
_TEMP_NAME = re.compile(r"^\.(?P<target>.*)" + re.escape(TEMP_MARK) + r"(?P<pid>\d+)-[^/]*\.tmp$")
# Fault injection for the kill tests: `N:SIGNAL` sends SIGNAL (INT or KILL) to this process while the
# N-th atomic write of the run is complete in its temp path but not yet renamed (the worst moment).
FAULT_AT_WRITE_ENV = "DPRUNER_DEBUG_SIGNAL_AT_WRITE"
_writes = 0


def temp_prefix(name: str) -> str:
    return f".{name}{TEMP_MARK}{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """A temp file/folder of ours whose process no longer runs."""
    match = _TEMP_NAME.match(path.name)
    return bool(match) and not _process_alive(int(match["pid"]))


def remove_stale_temps(folder: Path, target: str | None = None, recursive: bool = False) -> list[Path]:
    """Delete the temps that killed runs left in `folder` (only those for `target` when given)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in list(folder.iterdir()):
        match = _TEMP_NAME.match(entry.name)
        if match and (target is None or match["target"] == target) and is_stale_temp(entry):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temps(entry, recursive=True)
    return removed


def _fault_point() -> None:
    """Deliver the injected signal at the configured write (tests only; unset in normal runs)."""
    global _writes
    spec = os.environ.get(FAULT_AT_WRITE_ENV)
    if not spec:
        return
    _writes += 1
    count, _, name = spec.partition(":")
    if _writes == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_permissions(tmp_path)
        _fault_point()
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; it is renamed to `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        _fault_point()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line (per-example outputs), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DPrunerError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DPrunerError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise DPrunerError(f"{path}: file not found") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DPrunerError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    """A library error as one line (torch's and safetensors' messages run over several)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class StreamingSafetensors:
    """Write a safetensors file one tensor at a time, so a layer's scores never sit in memory together.

    The header (names, shapes, offsets) is known up front from the weight shapes; each tensor's bytes go
    to its offset as soon as it exists. The file appears at `target` only after `commit()`.
    """

    def __init__(self, target: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32):
        self.target = Path(target)
        self.dtype = dtype
        item = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {}
        offset = 0
        for name, shape in shapes.items():
            size = item * int(torch.Size(shape).numel())
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._start = 8 + len(raw)
        self._pending = set(shapes)
        self._header = header
        self._context = atomic_path(self.target)
        self._tmp = self._context.__enter__()
        self._handle = open(self._tmp, "r+b")
        self._handle.write(len(raw).to_bytes(8, "little") + raw)
        self._handle.truncate(self._start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._header[name]
        if list(tensor.shape) != entry["shape"]:
            raise ValueError(f"{name}: shape {list(tensor.shape)}, header says {entry['shape']}")
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._handle.seek(self._start + entry["data_offsets"][0])
        self._handle.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")  # no copy
        self._pending.discard(name)

    def commit(self) -> None:
        if self._pending:
            raise RuntimeError(f"tensors never written: {sorted(self._pending)}")
        self._handle.close()
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        self._handle.close()
        self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)


def layer_file(folder: Path, layer: int) -> Path:
    return folder / f"layer_{layer:03d}.safetensors"


class ScoreWriter:
    """Writes a score folder layer by layer, resuming a matching incomplete run.

    `settings` identifies the run: an incomplete folder is resumed only when its settings are equal,
    a complete one is never replaced without `overwrite`. Conflicts are raised by the constructor,
    which writes nothing: the folder is touched only when the first layer is saved.
    """

    def __init__(self, folder: str | os.PathLike, *, kind: str, model: str, num_layers: int,
                 modules: list[str], settings: dict[str, Any], overwrite: bool = False,
                 fingerprint: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.header = {
            "format": SCORE_FORMAT,
            "kind": kind,
            "model": model,
            "num_layers": num_layers,
            "modules": modules,
            "settings": settings,
            "code_version": __version__,
        }
        if fingerprint is not None:
            self.header[FINGERPRINT_KEY] = fingerprint
        self.layers_done = 0
        self.checksums: dict[str, str] = {}  # sha256 of each committed layer file, kept in the manifest
        self._clear_first = False  # replace an old folder, but only once the first layer is ready
        manifest_path = self.folder / MANIFEST
        if manifest_path.exists():
            old = read_json(manifest_path)
            if overwrite:
                self._clear_first = True
            elif old.get("complete"):
                raise DPrunerError(
                    f"{self.folder} already holds complete scores; pass --overwrite to replace them")
            elif self._same_run(old):
                self.layers_done = int(old.get("layers_done", 0))
                self.checksums = dict(old.get(CHECKSUM_KEY) or {})
            else:
                raise DPrunerError(
                    f"{self.folder} holds an unfinished run with other settings "
                    f"({self._first_difference(old)}); pass --overwrite to start over")
        elif self.folder.exists() and any(self.folder.iterdir()):
            if not overwrite:
                raise DPrunerError(
                    f"{self.folder} exists and is not a score folder; choose another --out or pass --overwrite")
            self._clear_first = True

    def _same_run(self, old: dict[str, Any]) -> bool:
        return all(old.get(key) == value for key, value in self.header.items() if key != "code_version")

    def _first_difference(self, old: dict[str, Any]) -> str:
        for key, value in self.header.items():
            if key == "settings":
                for skey, sval in value.items():
                    if old.get("settings", {}).get(skey) != sval:
                        return f"{skey}: {old.get('settings', {}).get(skey)!r} there, {sval!r} now"
            elif key != "code_version" and old.get(key) != value:
                return f"{key}: {old.get(key)!r} there, {value!r} now"
        return "unknown difference"

    def _clear(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _write_manifest(self, complete: bool, summary: dict[str, Any] | None = None) -> None:
        manifest = dict(self.header, layers_done=self.layers_done, complete=complete)
        manifest[CHECKSUM_KEY] = self.checksums
        if summary:
            manifest["summary"] = summary
        write_json(self.folder / MANIFEST, manifest)

    def resume_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Tensors saved with `save_layer(..., resume=...)` for a completed layer."""
        return load_tensors(self.folder / RESUME_DIR / f"layer_{layer:03d}.safetensors")

    def open_layer(self, layer: int, shapes: Mapping[str, tuple[int, ...]]) -> StreamingSafetensors:
        """Start the score file of `layer`; write each module's scores as they come, then
        `save_layer(layer, sink)` commits it."""
        if layer != self.layers_done:
            raise RuntimeError(f"layers must be saved in order: expected {self.layers_done}, got {layer}")
        if self._clear_first:
            self._clear()
            self._clear_first = False
        if layer == 0:  # the manifest comes first, so a run killed at any later point is recognised and resumed
            self._write_manifest(complete=False)
        return StreamingSafetensors(layer_file(self.folder, layer), shapes)

    def save_layer(self, layer: int, sink: StreamingSafetensors,
                   resume: Mapping[str, torch.Tensor] | None = None) -> None:
        state = None
        try:
            if resume is not None:  # tensor by tensor: no second copy of the layer in memory
                path = self.folder / RESUME_DIR / f"layer_{layer:03d}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                state = StreamingSafetensors(path, {k: tuple(v.shape) for k, v in resume.items()},
                                             next(iter(resume.values())).dtype)
                for name, tensor in resume.items():
                    state.write(name, tensor)
                state.commit()
                state = None
        except BaseException:  # interrupted: the layer's half-made files must not stay behind
            if state is not None:
                state.abort()
            sink.abort()
            raise
        sink.commit()
        self.checksums[sink.target.name] = sha256_file(sink.target)
        self.layers_done = layer + 1
        self._write_manifest(complete=False)

    def finish(self, summary: dict[str, Any] | None = None, keep_resume: bool = False) -> None:
        """Mark the folder complete, then drop the resume state (the other order loses it if killed between)."""
        self._write_manifest(complete=True, summary=summary)
        if not keep_resume and (self.folder / RESUME_DIR).exists():
            shutil.rmtree(self.folder / RESUME_DIR)


@dataclass
class ScoreSet:
    """Read access to per-layer scores in any supported layout (ours or the original `.pt` folders)."""

    folder: Path
    layout: str  # "dpruner" | "upstream-dual" | "upstream-general"
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ScoreSet:
        folder = Path(folder)
        if not folder.is_dir():
            raise DPrunerError(f"importance folder {folder} does not exist")
        if (folder / MANIFEST).exists():
            manifest = read_json(folder / MANIFEST)
            if manifest.get("format") != SCORE_FORMAT:
                raise DPrunerError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, expected {SCORE_FORMAT!r}")
            if not manifest.get("complete"):
                raise DPrunerError(
                    f"{folder} holds an unfinished run ({manifest.get('layers_done')} of "
                    f"{manifest.get('num_layers')} layers); finish it first")
            return cls(folder, "dpruner", manifest)
        for layout, dirs in (("upstream-dual", UPSTREAM_DUAL_DIRS), ("upstream-general", UPSTREAM_GENERAL_DIRS)):
            present = [d for d in dirs if (folder / d).is_dir()]
            if present:
                missing = sorted(set(dirs) - set(present))
                if missing:
                    raise DPrunerError(f"{folder}: original-layout importance lacks the folders {missing}")
                layers = sorted(int(p.stem) for p in (folder / present[0]).glob("*.pt") if p.stem.isdigit())
                num_layers = (layers[-1] + 1) if layers else 0
                manifest = {"format": layout, "kind": "upstream", "num_layers": num_layers,
                            "modules": list(dirs.values())}
                return cls(folder, layout, manifest)
        raise DPrunerError(
            f"{folder} holds no importance scores (expected {MANIFEST}, or the original Q/K/V/O/Gate/Up/Down "
            "or q_proj/.../down_proj folders of <layer>.pt files)")

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        if self.layout == "dpruner":
            path = layer_file(self.folder, index)
            if not path.exists():
                raise DPrunerError(f"{self.folder}: scores for layer {index} are missing ({path.name})")
            expected = (self.manifest.get(CHECKSUM_KEY) or {}).get(path.name)
            if expected is not None and sha256_file(path) != expected:
                raise DPrunerError(f"{path}: sha256 differs from the one in {MANIFEST} (the file was corrupted or "
                                   "changed after it was written); recompute these scores")
            return load_tensors(path)
        dirs = UPSTREAM_DUAL_DIRS if self.layout == "upstream-dual" else UPSTREAM_GENERAL_DIRS
        out = {}
        for short, module in dirs.items():
            path = self.folder / short / f"{index}.pt"
            if not path.exists():
                raise DPrunerError(f"{self.folder}: scores for layer {index} are missing ({short}/{index}.pt)")
            try:
                tensor = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise DPrunerError(f"{path}: cannot be read as a plain tensor file; only tensors are loaded from "
                                   f".pt files (weights_only=True), never other pickled objects "
                                   f"({first_line(err)})") from None
            if not isinstance(tensor, torch.Tensor):
                raise DPrunerError(f"{path}: holds {type(tensor).__name__}, expected a tensor")
            out[module] = tensor.float()
        return out


def export_upstream_dual(scores: ScoreSet, out: str | os.PathLike) -> None:
    """Write scores in the original stage-2 layout `<Proj>/<layer>.pt` (for use with the original scripts)."""
    out = Path(out)
    for layer in range(scores.num_layers):
        tensors = scores.layer(layer)
        for short, module in UPSTREAM_DUAL_DIRS.items():
            with atomic_path(out / short / f"{layer}.pt") as tmp:
                torch.save(tensors[module].clone(), tmp)


def save_score_folder(folder: str | os.PathLike, layers: list[Mapping[str, torch.Tensor]], *, kind: str,
                      model: str, settings: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a complete score folder in one go (temp folder, then rename)."""
    folder = Path(folder)
    manifest = {"format": SCORE_FORMAT, "kind": kind, "model": model, "num_layers": len(layers),
                "modules": sorted({name for layer in layers for name in layer}), "settings": settings,
                "code_version": __version__, "layers_done": len(layers), "complete": True, **(extra or {})}
    with atomic_dir(folder) as tmp:
        checksums = {}
        for index, tensors in enumerate(layers):
            path = layer_file(tmp, index)
            save_tensors(path, {k: v.float() for k, v in tensors.items()})
            checksums[path.name] = sha256_file(path)
        write_json(tmp / MANIFEST, dict(manifest, **{CHECKSUM_KEY: checksums}))
    return folder


def check_finite_scores(folder: str | os.PathLike, layers: list[Mapping[str, torch.Tensor]]) -> None:
    """A NaN score would rank arbitrarily: refuse to publish one (stage 2 calls this before saving)."""
    for index, tensors in enumerate(layers):
        for name, tensor in tensors.items():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise DPrunerError(f"{folder}: layer {index} {name} holds {bad} NaN/inf scores; not saved "
                                   "(check the learning rate, lambda and the general importance)")


def load_score_layers(folder: str | os.PathLike) -> list[dict[str, torch.Tensor]]:
    scores = ScoreSet.open(folder)
    return [scores.layer(i) for i in range(scores.num_layers)]

"""Layer streaming: prune checkpoints larger than memory, one decoder layer at a time.

Tensors are read straight from the checkpoint's safetensors files (one file or a sharded
`model.safetensors.index.json`) with plain reads, not mmap, so checkpoint pages never count as this
process's memory. The pruned model is written tensor by tensor into safetensors shards planned up
front from the checkpoint's header (the index is the one `save_pretrained` writes), inside a temp
folder that is renamed into place at the end. Peak memory is the embeddings, one layer, its
statistics and the calibration activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import json
import resource
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME, SparsityCounter, versions
from dpruner.io import StreamingSafetensors, atomic_dir, read_json, write_json
from dpruner.layerwise import LayerInputs, ResidentLayers
from dpruner.models import PROJECTIONS, build_skeleton, decoder_layers, projection_modules

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' save_pretrained shard limit up to v4 ("5GB"), so shards stay easy to copy and upload.
DEFAULT_SHARD_BYTES = 5 * 10**9
OFFLOAD_MODES = ("auto", "none", "disk")
# `--offload auto` streams when the weights would take more than this share of the available memory
# (ours: the rest is for activations, Hessians and the solver's temporaries).
FIT_FRACTION = 0.6
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Files beside the weights that a pruned folder keeps as they are.
_COPIED_FILES = ("generation_config.json",)
# glibc's mallopt parameter M_MMAP_THRESHOLD (malloc.h), and the size from which buffers (layer
# tensors, Hessians) get their own mapping: glibc's default raises the threshold after the first
# large free and then keeps freed layers in its heap, so a streamed run would grow with depth
# (64 KiB: flat in depth in bench/scale_memory.py; 1 MiB still grew by ~4 MB a layer).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 16


def map_large_buffers() -> None:
    """Make freed layers go back to the operating system (glibc; other allocators already do)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise DPrunerError(f"{path}: tensor {name} has dtype {info['dtype']}; streaming reads "
                               f"{', '.join(_DTYPES)} checkpoints")
        begin, end = info["data_offsets"]
        entries[name] = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


class CheckpointReader:
    """Names, shapes and bytes of every tensor of a safetensors checkpoint folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / INDEX_FILE).exists():
            files = sorted(set(read_json(folder / INDEX_FILE)["weight_map"].values()))
        elif (folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise DPrunerError(f"model folder {folder} has no {SINGLE_FILE} or {INDEX_FILE} "
                               "(streaming reads safetensors checkpoints)")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            if not (folder / name).exists():
                raise DPrunerError(f"{folder / INDEX_FILE} names {name}, which is missing")
            self.entries.update(_read_header(folder / name))

    def numel(self) -> int:
        return sum(torch.Size(entry.shape).numel() for entry in self.entries.values())

    def layer_keys(self, index: int) -> list[str]:
        keys = sorted(k for k in self.entries if k.startswith(layer_prefix(index)))
        if not keys:
            raise DPrunerError(f"checkpoint {self.folder} has no tensors named {layer_prefix(index)}* "
                               "(streaming needs the standard Hugging Face tensor names)")
        return keys

    def other_keys(self) -> list[str]:
        return sorted(k for k in self.entries if not k.startswith("model.layers."))

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        entry = self.entries[name]
        raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            if handle.readinto(memoryview(raw.numpy())) != raw.numel():
                raise DPrunerError(f"{entry.file}: tensor {name} is truncated")
        tensor = raw.view(entry.dtype).reshape(entry.shape)
        return tensor if dtype is None or dtype == entry.dtype else tensor.to(dtype)

    def read_layer(self, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer `index` keyed by names inside the layer (`self_attn.q_proj.weight`, ...)."""
        prefix = layer_prefix(index)
        return {key.removeprefix(prefix): self.read(key, dtype) for key in self.layer_keys(index)}


class ShardedWriter:
    """Safetensors shards whose layout is fixed up front, so every tensor is written (and its memory
    freed) as soon as it exists; a shard is committed when its last tensor arrives."""

    def __init__(self, folder: Path, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        item = torch.empty((), dtype=dtype).element_size()
        groups: list[list[str]] = [[]]
        used = 0
        for name, shape in shapes.items():
            size = torch.Size(shape).numel() * item
            if groups[-1] and used + size > max_shard_bytes:
                groups.append([])
                used = 0
            groups[-1].append(name)
            used += size
        count = len(groups)
        self.files = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                       for i in range(count)]
        self.folder, self.dtype, self.total_size = folder, dtype, item * sum(torch.Size(s).numel() for s in shapes.values())
        self._shapes = dict(shapes)
        self._groups = groups
        self._shard_of = {name: i for i, group in enumerate(groups) for name in group}
        self._left = [len(group) for group in groups]
        self._open: dict[int, StreamingSafetensors] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard_of[name]
        if shard not in self._open:
            self._open[shard] = StreamingSafetensors(self.folder / self.files[shard],
                                                     {n: self._shapes[n] for n in self._groups[shard]}, self.dtype)
        self._open[shard].write(name, tensor)
        self._left[shard] -= 1
        if not self._left[shard]:
            self._open.pop(shard).commit()

    def finish(self) -> None:
        unwritten = [name for name, shard in self._shard_of.items() if self._left[shard]]
        if unwritten:
            raise RuntimeError(f"tensors never written: {unwritten[:5]}")
        if len(self.files) > 1:
            write_json(self.folder / INDEX_FILE, {"metadata": {"total_size": self.total_size},
                                                  "weight_map": {n: self.files[s] for n, s in self._shard_of.items()}})

    def abort(self) -> None:
        for sink in self._open.values():
            sink.abort()
        self._open.clear()


class StreamedOutput:
    """A pruned model folder written layer by layer: checkpoint tensor names, `dtype`, temp folder
    beside `out` renamed into place by `finish`, sparsity counted as the tensors pass."""

    def __init__(self, out: Path, reader: CheckpointReader, dtype: torch.dtype,
                 max_shard_bytes: int | None = None) -> None:
        map_large_buffers()
        self.out, self.reader, self.dtype, self.sparsity = Path(out), reader, dtype, SparsityCounter()
        self._context = atomic_dir(out)
        self.folder = self._context.__enter__()
        shapes = {key: reader.entries[key].shape for key in reader.entries}
        self.writer = ShardedWriter(self.folder, shapes, dtype, max_shard_bytes or DEFAULT_SHARD_BYTES)
        for key in reader.other_keys():  # embeddings, final norm, head: copied (cast) once
            tensor = reader.read(key, dtype)
            self.writer.write(key, tensor)
            self.sparsity.add_tensor(tensor)

    def write_layer(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """`tensors`: the whole layer, keyed by names inside it (`mlp.up_proj.weight`, ...)."""
        projections = {name: tensors[f"{name}.weight"] for name in PROJECTIONS}
        self.sparsity.add_layer(index, projections,
                                [t for key, t in tensors.items() if key.removesuffix(".weight") not in projections])
        prefix = layer_prefix(index)
        for key, tensor in tensors.items():
            self.writer.write(prefix + key, tensor)

    def finish(self, config, tokenizer, report: dict[str, Any]) -> Path:
        self.writer.finish()
        config = type(config).from_dict(config.to_dict())
        config.dtype = self.dtype
        config.save_pretrained(self.folder)
        for name in _COPIED_FILES:
            if (self.reader.folder / name).exists():
                shutil.copy2(self.reader.folder / name, self.folder / name)
        tokenizer.save_pretrained(self.folder)
        full = dict(report, versions=versions(), sparsity=self.sparsity.report())
        full.setdefault("command", " ".join(sys.argv))
        write_json(self.folder / REPORT_NAME, full)
        self._context.__exit__(None, None, None)
        return self.out

    def abort(self) -> None:
        self.writer.abort()
        self._context.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _assign(module: nn.Module, tensors: Mapping[str, torch.Tensor], where: str, strict: bool = True) -> None:
    """Make `tensors` the module's parameters (no copy); a missing or unknown name is a user error."""
    missing, unexpected = module.load_state_dict(dict(tensors), strict=False, assign=True)
    if unexpected or (strict and missing):
        raise DPrunerError(f"{where}: tensors do not match the model's config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


EMBEDDINGS = "model.embed_tokens.weight"


def open_streamed(handle, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model with only its small non-layer weights (final norm) loaded: the decoder layers stay on
    the meta device until `StreamedLayers.fetch` reads them, the embeddings until `capture` needs them
    (the head is not needed by the layer-wise driver)."""
    map_large_buffers()
    model = build_skeleton(handle.config, handle.name)
    reader = handle.checkpoint
    inner = {key.removeprefix("model."): reader.read(key, dtype).to(device)
             for key in reader.other_keys() if key.startswith("model.") and key != EMBEDDINGS}
    _assign(model.model, inner, f"checkpoint {reader.folder}", strict=False)
    unloaded = [name for name, param in model.model.named_parameters()
                if param.is_meta and not name.startswith(("layers.", "embed_tokens."))]
    if unloaded or EMBEDDINGS not in reader.entries:
        raise DPrunerError(f"checkpoint {reader.folder} has no tensors for "
                           f"{', '.join(f'model.{n}' for n in unloaded) or EMBEDDINGS}")
    model.config.use_cache = False
    return model.eval()


class StreamedLayers(ResidentLayers):
    """Layer source of `prune_layerwise`: layer i is read from the checkpoint when the driver needs it,
    then written to `output` (when the pruned model is saved) and dropped back to the meta device.
    The embeddings are read only for the layer-0 capture and dropped after it."""

    def __init__(self, model: nn.Module, reader: CheckpointReader, dtype: torch.dtype, device: torch.device,
                 output: StreamedOutput | None = None) -> None:
        super().__init__(model, device)
        self.reader, self.dtype, self.output = reader, dtype, output

    def capture(self, model: nn.Module, calibration: dict[str, torch.Tensor],
                batch_size: int) -> dict[str, LayerInputs]:
        embeddings = model.model.embed_tokens
        _assign(embeddings, {"weight": self.reader.read(EMBEDDINGS, self.dtype).to(self.device)},
                f"checkpoint {self.reader.folder}")
        try:
            return super().capture(model, calibration, batch_size)
        finally:
            embeddings.to("meta")

    def fetch(self, index: int) -> nn.Module:
        layer = self.layers[index]
        tensors = {k: v.to(self.device) for k, v in self.reader.read_layer(index, self.dtype).items()}
        _assign(layer, tensors, f"checkpoint {self.reader.folder} layer {index}")
        return layer

    def release(self, index: int, layer: nn.Module) -> None:
        if self.output is not None:
            self.output.write_layer(index, layer.state_dict())
        layer.to("meta")


def stream_masked_copy(handle, output: StreamedOutput,
                       layer_masks: Callable[[int, Mapping[str, nn.Linear]], Mapping[str, torch.Tensor]]) -> tuple[int, int]:
    """Stage 3 one layer at a time: read the layer, zero what `layer_masks` prunes, write it.
    Returns (masked weights, projection weights)."""
    layers = decoder_layers(handle.skeleton)
    masked = total = 0
    for index in tqdm(range(len(layers)), desc="masking layers", unit="layer"):
        masks = layer_masks(index, projection_modules(layers[index]))
        tensors = handle.checkpoint.read_layer(index, output.dtype)
        for name, mask in masks.items():
            tensors[f"{name}.weight"].masked_fill_(mask.cpu(), 0)
            masked += int(mask.sum())
            total += mask.numel()
        output.write_layer(index, tensors)
    return masked, total


def available_memory() -> int | None:
    """Bytes this process may still allocate: the least of MemAvailable, the address-space limit
    left and the cgroup limit left (None where none of them can be read)."""
    limits = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft - int(status["VmSize"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        maximum = (cgroup / "memory.max").read_text().strip()
        if maximum != "max":
            limits.append(int(maximum) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def add_offload_option(parser) -> None:
    """`--offload` of every pruning CLI that reads a whole model."""
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="auto",
                        help="disk: stream one decoder layer at a time from the checkpoint's safetensors and write "
                             "the output shard by shard (models larger than memory); none: load the whole model; "
                             f"auto: disk when the weights would take over {FIT_FRACTION:.0%}% of the free memory")


def should_stream(offload: str, handle, dtype: torch.dtype) -> bool:
    """`disk`: always stream; `none`: never; `auto`: when a local safetensors checkpoint's weights in
    `dtype` would take more than FIT_FRACTION of the memory available."""
    if offload not in OFFLOAD_MODES:
        raise DPrunerError(f"--offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if offload == "none":
        return False
    if offload == "disk":
        handle.checkpoint  # a one-line error for hub ids and folders without safetensors
        return True
    folder = Path(handle.path)
    if not handle.is_local or not ((folder / SINGLE_FILE).exists() or (folder / INDEX_FILE).exists()):
        return False
    available = available_memory()
    need = handle.checkpoint.numel() * torch.empty((), dtype=dtype).element_size()
    return available is not None and need > FIT_FRACTION * available

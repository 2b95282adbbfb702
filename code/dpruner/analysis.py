"""Mask analysis: how much of each layer and projection is pruned, and how far two masks agree.

A source is either a pruned Hugging Face model folder (its mask is the weights that are exactly 0 in the
7 projections of every decoder layer) or a score folder (its mask is derived with `masks.select`, as
stage 3 would). Both are read one decoder layer at a time, so two 7B models never sit in memory
together: only counts are kept (pruned weights per source, shared pruned weights per pair), from which
every sparsity and Jaccard value, per cell and pooled over layers and/or projections, follows exactly.

Jaccard(A, B) = |A ∩ B| / |A ∪ B| over pruned positions, 1.0 when both masks are empty. The reference
value for independent random masks with the same pruned counts is E|A ∩ B| = k_a k_b / n per matrix,
i.e. s_a s_b / (s_a + s_b - s_a s_b) for one matrix.
"""

from __future__ import annotations

import csv
import itertools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dpruner import __version__, cli
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME
from dpruner.guard import Output, protect
from dpruner.io import (MANIFEST, UPSTREAM_DUAL_DIRS, UPSTREAM_GENERAL_DIRS, ScoreSet, atomic_dir, layer_file,
                        read_json, write_json)
from dpruner.masks import parse_pattern, select
from dpruner.models import PROJECTIONS

ALL = "all"  # the layer / module value of rows pooled over every layer / projection
SCOPES = ("matrix", "block", "row")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
MAX_ANNOTATED_LAYERS = 40  # beyond this, numbers in the sparsity heatmap cells become unreadable

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class MaskOptions:
    """How score folders become masks (pruned model folders carry their own mask)."""

    sparsity: float = 0.5
    scope: str = "matrix"
    blocks: int = 32
    pattern: str = "unstructured"

    def check(self) -> None:
        cli.check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.scope not in SCOPES:
            raise DPrunerError(f"--scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.blocks < 1:
            raise DPrunerError(f"--blocks must be >= 1, got {self.blocks}")

    def describe(self) -> dict[str, Any]:
        n_m = parse_pattern(self.pattern)
        if n_m:
            return {"pattern": self.pattern, "sparsity": n_m[0] / n_m[1]}
        return {"sparsity": self.sparsity, "scope": self.scope,
                **({"blocks": self.blocks} if self.scope == "block" else {})}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard of two boolean masks (True = pruned)."""
    inter = int((a & b).sum())
    return overlap_ratio(inter, int(a.sum()) + int(b.sum()) - inter)


def overlap_ratio(intersection: float, union: float) -> float:
    """|A ∩ B| / |A ∪ B|, defined as 1.0 for two empty masks (they agree completely)."""
    return 1.0 if union == 0 else intersection / union


class MaskSource(ABC):
    """One labelled input, read one decoder layer at a time."""

    kind: str
    num_layers: int

    def __init__(self, label: str, path: Path) -> None:
        self.label, self.path = label, path

    @abstractmethod
    def shapes(self, layer: int) -> Shapes | None:
        """Projection shapes of `layer` from file headers, or None when only loading would tell."""

    @abstractmethod
    def masks(self, layer: int) -> dict[str, torch.Tensor]:
        """Boolean mask (True = pruned) of every projection of `layer`."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What summary.json records about the source."""

    def error(self, message: str) -> DPrunerError:
        return DPrunerError(f"{self.label}={self.path}: {message}")


def _header_shapes(path: Path, keys: dict[str, str]) -> Shapes:
    """Shapes of `keys` (module -> tensor name) from a safetensors header, without reading data."""
    with safe_open(str(path), framework="pt") as handle:
        return {module: tuple(handle.get_slice(key).get_shape()) for module, key in keys.items()}


class ModelMasks(MaskSource):
    """A (pruned) Hugging Face model folder in safetensors, single file or sharded."""

    kind = "model"

    def __init__(self, label: str, path: Path) -> None:
        super().__init__(label, path)
        self.files = self._weight_files()
        layers = {int(m[1]) for key in self.files if (m := _LAYER_KEY.fullmatch(key)) and m[2] in PROJECTIONS}
        if not layers:
            raise self.error("no decoder-layer projection weights (model.layers.<i>.<module>.weight) found")
        self.num_layers = max(layers) + 1
        missing = [key for i in range(self.num_layers) for m in PROJECTIONS if (key := self.key(i, m)) not in self.files]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.error(f"weight {missing[0]} is missing{more}")
        report = path / REPORT_NAME
        self.report = read_json(report) if report.exists() else None

    def _weight_files(self) -> dict[str, Path]:
        """Tensor name -> safetensors file, from the shard index or the single file's header."""
        if (self.path / SAFETENSORS_INDEX).exists():
            try:
                weight_map = read_json(self.path / SAFETENSORS_INDEX).get("weight_map", {})
            except DPrunerError as err:
                raise self.error(str(err)) from None
            files = {key: self.path / name for key, name in weight_map.items()}
            absent = sorted({f.name for f in files.values() if not f.exists()})
            if absent:
                raise self.error(f"{SAFETENSORS_INDEX} names shard {absent[0]}, which is missing")
            return files
        try:
            with safe_open(str(self.path / SAFETENSORS_SINGLE), framework="pt") as handle:
                return dict.fromkeys(handle.keys(), self.path / SAFETENSORS_SINGLE)
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise self.error(f"{SAFETENSORS_SINGLE} is not readable ({err})") from None

    @staticmethod
    def key(layer: int, module: str) -> str:
        return f"model.layers.{layer}.{module}.weight"

    def _by_file(self, layer: int) -> dict[Path, dict[str, str]]:
        grouped: dict[Path, dict[str, str]] = {}
        for module in PROJECTIONS:
            grouped.setdefault(self.files[self.key(layer, module)], {})[module] = self.key(layer, module)
        return grouped

    def shapes(self, layer: int) -> Shapes:
        try:
            return {m: s for path, keys in self._by_file(layer).items() for m, s in _header_shapes(path, keys).items()}
        except Exception as err:
            raise self.error(f"cannot read the weights of layer {layer} ({err})") from None

    def masks(self, layer: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, keys in self._by_file(layer).items():
            with safe_open(str(path), framework="pt") as handle:
                for module, key in keys.items():
                    out[module] = handle.get_tensor(key) == 0
        return out

    def describe(self) -> dict[str, Any]:
        report = self.report or {}
        return {"kind": self.kind, "path": str(self.path), "num_layers": self.num_layers,
                "pruning_report": {k: report[k] for k in ("method", "base_model", "mask") if k in report} or None}


class ScoreMasks(MaskSource):
    """A score folder (ours or the original `.pt` layouts); masks follow `MaskOptions` as in stage 3."""

    kind = "scores"

    def __init__(self, label: str, path: Path, options: MaskOptions) -> None:
        super().__init__(label, path)
        try:
            self.scores = ScoreSet.open(path)
        except DPrunerError as err:
            raise self.error(str(err)) from None
        self.num_layers = self.scores.num_layers
        if self.num_layers == 0:
            raise self.error("the score folder holds no layers")
        absent = [m for m in PROJECTIONS if m not in self.scores.manifest.get("modules", PROJECTIONS)]
        if absent:
            raise self.error(f"{MANIFEST} lists no scores for {', '.join(absent)}")
        self.options = options

    def shapes(self, layer: int) -> Shapes | None:
        if self.scores.layout != "dpruner":
            return None
        path = layer_file(self.path, layer)
        if not path.exists():
            raise self.error(f"scores for layer {layer} are missing ({path.name})")
        try:
            return _header_shapes(path, {m: m for m in PROJECTIONS})
        except Exception as err:
            raise self.error(f"{path.name} lacks projection scores or is unreadable ({err})") from None

    def masks(self, layer: int) -> dict[str, torch.Tensor]:
        tensors = self.scores.layer(layer)
        out: dict[str, torch.Tensor] = {}
        o = self.options
        for module in PROJECTIONS:
            score = tensors.pop(module, None)  # drop each score tensor once its mask exists
            if score is None:
                raise self.error(f"layer {layer} has no scores for {module}")
            if score.dim() != 2 or not bool(torch.isfinite(score).all()):
                raise self.error(f"layer {layer} {module}: scores must be a finite matrix "
                                 f"(shape {list(score.shape)})")
            try:
                out[module] = select(score, o.sparsity, scope=o.scope, blocks=o.blocks, pattern=o.pattern)
            except DPrunerError as err:
                raise self.error(f"layer {layer} {module}: {err}") from None
        return out

    def describe(self) -> dict[str, Any]:
        manifest = self.scores.manifest
        return {"kind": self.kind, "path": str(self.path), "num_layers": self.num_layers,
                "layout": self.scores.layout, "score_kind": manifest.get("kind"), "model": manifest.get("model"),
                "mask": self.options.describe()}


def parse_source_spec(spec: str) -> tuple[str, Path]:
    """`LABEL=PATH` -> (label, absolute path); the label becomes part of file names."""
    label, sep, path = spec.partition("=")
    if not sep or not path:
        raise DPrunerError(f"source {spec!r} is not LABEL=PATH (for example legal=outputs/pruned_legal)")
    if not LABEL_RE.fullmatch(label):
        raise DPrunerError(f"source {spec!r}: label {label!r} must start with a letter or digit and hold only "
                           "letters, digits and . _ + -")
    return label, cli.resolve_out(path)


def open_source(label: str, path: Path, options: MaskOptions) -> MaskSource:
    """A model folder (safetensors weights) or a score folder, whichever `path` is."""
    if not path.is_dir():
        raise DPrunerError(f"{label}={path}: folder does not exist")
    if (path / SAFETENSORS_INDEX).exists() or (path / SAFETENSORS_SINGLE).exists():
        return ModelMasks(label, path)
    if (path / MANIFEST).exists() or any((path / d).is_dir() for d in (*UPSTREAM_DUAL_DIRS, *UPSTREAM_GENERAL_DIRS)):
        return ScoreMasks(label, path, options)
    hint = " (it has config.json but no safetensors weights; re-save with safe_serialization=True)" \
        if (path / "config.json").exists() else ""
    raise DPrunerError(f"{label}={path}: neither a model folder ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}) nor a "
                       f"score folder ({MANIFEST} + layer_XXX.safetensors, or the original Q/K/V/O/Gate/Up/Down "
                       f"or q_proj/.../down_proj folders of <layer>.pt){hint}")


def open_sources(specs: list[str], options: MaskOptions) -> list[MaskSource]:
    parsed = [parse_source_spec(spec) for spec in specs]
    labels = [label for label, _ in parsed]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate:
        raise DPrunerError(f"label {duplicate!r} is given twice; every source needs its own label")
    return [open_source(label, path, options) for label, path in parsed]


def check_same_shapes(layer: int, shapes: dict[str, Shapes]) -> None:
    """All sources prune matrices of the same shapes at `layer` (else their masks cannot be compared)."""
    (first, reference), *rest = shapes.items()
    for label, other in rest:
        for module in PROJECTIONS:
            if other[module] != reference[module]:
                raise DPrunerError(f"sources {first!r} and {label!r} differ at layer {layer} {module}: shape "
                                   f"{list(reference[module])} vs {list(other[module])} (different architectures?)")


def check_compatible(sources: list[MaskSource]) -> None:
    """Same layer count and, where file headers tell cheaply, the same shapes, before any mask is built."""
    counts = {s.label: s.num_layers for s in sources}
    if len(set(counts.values())) > 1:
        raise DPrunerError("sources have different numbers of decoder layers: "
                           + ", ".join(f"{label}={n}" for label, n in counts.items()))
    for layer in range(sources[0].num_layers):
        known = {s.label: shape for s in sources if (shape := s.shapes(layer)) is not None}
        if len(known) > 1:
            check_same_shapes(layer, known)


@dataclass
class MaskCounts:
    """Counts per (layer, projection) cell, [num_layers, 7] int64 tables."""

    labels: list[str]
    pairs: list[tuple[str, str]]  # every unordered pair, in the order the sources were given
    total: torch.Tensor
    pruned: dict[str, torch.Tensor]
    shared: dict[tuple[str, str], torch.Tensor]

    def expected_shared(self, a: str, b: str) -> torch.Tensor:
        """E|A ∩ B| per cell for random masks with these pruned counts (hypergeometric mean)."""
        return self.pruned[a].double() * self.pruned[b].double() / self.total.double().clamp(min=1)


def count_masks(sources: list[MaskSource], progress: Callable[[int, int], None] | None = None) -> MaskCounts:
    """One pass over the layers; only the current layer's masks of every source are in memory."""
    check_compatible(sources)
    num_layers, cells = sources[0].num_layers, (sources[0].num_layers, len(PROJECTIONS))
    labels = [s.label for s in sources]
    pairs = list(itertools.combinations(labels, 2))
    counts = MaskCounts(labels, pairs, torch.zeros(cells, dtype=torch.int64),
                        {label: torch.zeros(cells, dtype=torch.int64) for label in labels},
                        {pair: torch.zeros(cells, dtype=torch.int64) for pair in pairs})
    for layer in range(num_layers):
        masks = {s.label: s.masks(layer) for s in sources}
        check_same_shapes(layer, {label: {m: tuple(t.shape) for m, t in layer_masks.items()}
                                  for label, layer_masks in masks.items()})
        for column, module in enumerate(PROJECTIONS):
            counts.total[layer, column] = masks[counts.labels[0]][module].numel()
            for label in counts.labels:
                counts.pruned[label][layer, column] = int(masks[label][module].sum())
            for a, b in counts.pairs:
                counts.shared[a, b][layer, column] = int((masks[a][module] & masks[b][module]).sum())
        del masks
        if progress:
            progress(layer + 1, num_layers)
    return counts


Cell = tuple[int | str, str]  # (layer or "all", module or "all")


def pooled(table: torch.Tensor) -> dict[Cell, float]:
    """Every cell, then per layer over all projections, per projection over all layers, and overall."""
    out: dict[Cell, float] = {}
    for layer in range(table.shape[0]):
        out.update({(layer, module): table[layer, column].item() for column, module in enumerate(PROJECTIONS)})
        out[layer, ALL] = table[layer].sum().item()
    out.update({(ALL, module): table[:, column].sum().item() for column, module in enumerate(PROJECTIONS)})
    out[ALL, ALL] = table.sum().item()
    return out


def sparsity_rows(counts: MaskCounts) -> list[dict[str, Any]]:
    total = pooled(counts.total)
    rows = []
    for label in counts.labels:
        for (layer, module), pruned in pooled(counts.pruned[label]).items():
            rows.append({"source": label, "layer": layer, "module": module, "pruned": int(pruned),
                         "total": int(total[layer, module]), "sparsity": pruned / total[layer, module]})
    return rows


def jaccard_rows(counts: MaskCounts) -> list[dict[str, Any]]:
    total = pooled(counts.total)
    rows = []
    for a, b in counts.pairs:
        pruned_a, pruned_b = pooled(counts.pruned[a]), pooled(counts.pruned[b])
        expected = pooled(counts.expected_shared(a, b))
        for cell, shared in pooled(counts.shared[a, b]).items():
            either = pruned_a[cell] + pruned_b[cell]
            rows.append({"source_a": a, "source_b": b, "layer": cell[0], "module": cell[1],
                         "sparsity_a": pruned_a[cell] / total[cell], "sparsity_b": pruned_b[cell] / total[cell],
                         "intersection": int(shared), "union": int(either - shared),
                         "jaccard": overlap_ratio(shared, either - shared),
                         "random_jaccard": overlap_ratio(expected[cell], either - expected[cell])})
    return rows


def _overall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["layer"] == ALL and row["module"] == ALL]


def check_output(out: Path, overwrite: bool, sources: list[MaskSource]) -> None:
    """Refuse a non-empty --out without --overwrite, and one whose replacement would delete an input."""
    if out.exists() and not out.is_dir():
        raise DPrunerError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DPrunerError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    for protected in [Path.cwd(), *(s.path for s in sources)]:
        if out.resolve() == protected.resolve() or out.resolve() in protected.resolve().parents:
            raise DPrunerError(f"--out {out} would replace {protected}; choose a separate output folder")
    protect([Output("--out", out)], {f"source {s.label!r}": s.path for s in sources})


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)


def _short(module: str) -> str:
    return module.split(".")[-1]


def _heatmap(ax, data: torch.Tensor, cell_text: list[list[str]] | None, xlabels: list[str], ylabels: list[str],
             colorbar_label: str) -> None:
    """Matrix plot on a fixed 0..1 scale (comparable across figures), optionally annotated."""
    image = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=30, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    if cell_text:
        for row, texts in enumerate(cell_text):
            for column, text in enumerate(texts):
                ax.text(column, row, text, ha="center", va="center", fontsize=7,
                        color="black" if data[row, column] > 0.6 else "white")



def plot_all(folder: Path, counts: MaskCounts, sparsity: list[dict[str, Any]],
             pairs: list[dict[str, Any]]) -> list[str]:
    """sparsity_heatmap_<label>.png per source; jaccard_heatmap.png and jaccard_by_layer.png for 2+ sources."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    num_layers = counts.total.shape[0]
    modules = [_short(m) for m in PROJECTIONS]
    layer_ticks = [str(i) for i in range(num_layers)]
    annotate = num_layers <= MAX_ANNOTATED_LAYERS
    written = []
    for label in counts.labels:
        table = counts.pruned[label].double() / counts.total.double().clamp(min=1)
        overall = next(r["sparsity"] for r in _overall(sparsity) if r["source"] == label)
        fig, ax = plt.subplots(figsize=(7.5, max(3.5, 0.28 * num_layers + 2.0)))
        _heatmap(ax, table, [[f"{v:.2f}" for v in row] for row in table.tolist()] if annotate else None,
                 modules, layer_ticks, "sparsity (pruned fraction)")
        ax.set(title=f"{label}: sparsity per layer and projection (overall {overall:.1%})",
               xlabel="projection", ylabel="decoder layer")
        written.append(_save(fig, folder / f"sparsity_heatmap_{label}.png"))
    if not counts.pairs:
        return written

    size = len(counts.labels)
    matrix = torch.eye(size, dtype=torch.float64)
    text = [["1" if i == j else "" for j in range(size)] for i in range(size)]
    for row in _overall(pairs):
        i, j = counts.labels.index(row["source_a"]), counts.labels.index(row["source_b"])
        matrix[i, j] = matrix[j, i] = row["jaccard"]
        text[i][j] = text[j][i] = f"{row['jaccard']:.3f}\n(random {row['random_jaccard']:.3f})"
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * size, 1.5 + 1.3 * size))
    _heatmap(ax, matrix, text, counts.labels, counts.labels, "Jaccard |A∩B| / |A∪B| of pruned weights")
    ax.set(title="Mask overlap over all layers and projections", xlabel="source", ylabel="source")
    written.append(_save(fig, folder / "jaccard_heatmap.png"))

    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * num_layers + 3.0) + 2.5, 4.5))
    for index, (a, b) in enumerate(counts.pairs):
        per_layer = [r for r in pairs if r["source_a"] == a and r["source_b"] == b
                     and r["layer"] != ALL and r["module"] == ALL]
        colour = f"C{index % 10}"
        ax.plot(range(num_layers), [r["jaccard"] for r in per_layer], marker="o", color=colour, label=f"{a} vs {b}")
        ax.plot(range(num_layers), [r["random_jaccard"] for r in per_layer], linestyle="--", color=colour, alpha=0.6)
    ax.set(title="Mask overlap per decoder layer", xlabel="decoder layer", ylabel="Jaccard of pruned weights",
           ylim=(0.0, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: random masks", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    written.append(_save(fig, folder / "jaccard_by_layer.png"))
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def markdown_summary(counts: MaskCounts, sparsity: list[dict[str, Any]], pairs: list[dict[str, Any]],
                     sources: list[MaskSource]) -> str:
    """Overall sparsity per source and the pairwise Jaccard matrix (random-mask value in parentheses)."""
    kinds = {s.label: s.kind for s in sources}
    lines = ["| source | kind | sparsity of the 7 projections |", "|---|---|---|"]
    lines += [f"| {r['source']} | {kinds[r['source']]} | {r['sparsity']:.2%} |" for r in _overall(sparsity)]
    if counts.pairs:
        value = {(r["source_a"], r["source_b"]): f"{r['jaccard']:.3f} ({r['random_jaccard']:.3f})"
                 for r in _overall(pairs)}
        lines += ["", "Jaccard of pruned weights (independent random masks in parentheses):", "",
                  "| | " + " | ".join(counts.labels) + " |", "|---" * (len(counts.labels) + 1) + "|"]
        for a in counts.labels:
            cells = ["1" if a == b else value.get((a, b)) or value[b, a] for b in counts.labels]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPARSITY_COLUMNS = ["source", "layer", "module", "pruned", "total", "sparsity"]
JACCARD_COLUMNS = ["source_a", "source_b", "layer", "module", "sparsity_a", "sparsity_b", "intersection", "union",
                   "jaccard", "random_jaccard"]


def write_outputs(out: Path, counts: MaskCounts, sources: list[MaskSource], options: MaskOptions) -> str:
    """Write every file into a temporary folder that replaces `out` at the end; returns the markdown summary."""
    sparsity, pairs = sparsity_rows(counts), jaccard_rows(counts)
    markdown = markdown_summary(counts, sparsity, pairs, sources)
    with atomic_dir(out) as tmp:
        _write_csv(tmp / "sparsity.csv", sparsity, SPARSITY_COLUMNS)
        _write_csv(tmp / "jaccard.csv", pairs, JACCARD_COLUMNS)
        figures = plot_all(tmp, counts, sparsity, pairs)
        per_module = [r for r in sparsity if r["layer"] == ALL]  # the "all" module row is the overall one
        write_json(tmp / "summary.json", {
            "tool": "analyze_masks", "dpruner_version": __version__, "score_mask": options.describe(),
            "sources": [{"label": s.label, **s.describe(),
                         "sparsity": {r["module"]: r["sparsity"] for r in per_module if r["source"] == s.label}}
                        for s in sources],
            "jaccard": [{k: r[k] for k in ("source_a", "source_b", "sparsity_a", "sparsity_b", "jaccard",
                                           "random_jaccard")} for r in _overall(pairs)],
            "files": ["sparsity.csv", "jaccard.csv", *figures, "summary.json"],
            "summary_markdown": markdown,
        })
    return markdown

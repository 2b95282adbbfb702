"""Stage 3 of D-Pruner: turn importance scores into a pruned Hugging Face model.

The mask is applied to the ORIGINAL pretrained weights (the original code reloads the base model; the
weights fine-tuned in stage 2 only served to produce the scores). Every check that can fail (options,
output folder, score folder, layer count, each score tensor's module/shape/finiteness, block widths)
runs before anything is written, and the model itself is changed only after every layer's mask is
known, so a bad input never leaves a half-pruned model in memory or on disk.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpruner import cli
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME, check_output_dir, save_pruned_model
from dpruner.guard import Output, model_inputs, protect
from dpruner.io import ScoreSet
from dpruner.masks import parse_pattern, select
from dpruner.model_handle import ModelHandle
from dpruner.models import EMBEDDED_MODEL, PROJECTIONS, decoder_layers, projection_modules, resolve_device, resolve_dtype
from dpruner.pipeline import check_model_structure
from dpruner.provenance import ALLOW_OPTION, check_same_model
from dpruner.streaming import StreamedOutput, add_offload_option, should_stream, stream_masked_copy

# The original save_model.py / save_model_iterative.py prune `importance <= numpy.percentile(·, 52)`.
DEFAULT_SPARSITY = 0.52
# save_model_iterative.py splits each matrix's input dimension into 32 equal column blocks
# (128 wide for LLaMA-2-7B's 4096 inputs, 344 wide for down_proj's 11008).
DEFAULT_BLOCKS = 32
SCOPES = ("matrix", "block")
# Checkpoint dtypes that `--dtype auto` keeps as they are (models.resolve_dtype accepts these names).
_KEPT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def check_options(sparsity: float, scope: str, blocks: int, pattern: str) -> None:
    """Reject bad mask options before any model or score is read."""
    cli.check_sparsity(sparsity)
    parse_pattern(pattern)
    if scope not in SCOPES:
        raise DPrunerError(f"mask scope {scope!r} is not one of {', '.join(SCOPES)}")
    if scope == "block" and blocks < 1:
        raise DPrunerError(f"--blocks must be >= 1, got {blocks}")


def check_layer_scores(source: Path, index: int, tensors: Mapping[str, torch.Tensor],
                       modules: Mapping[str, nn.Linear]) -> None:
    """Every projection has a finite score tensor shaped exactly like its weight."""
    missing = [name for name in modules if name not in tensors]
    if missing:
        raise DPrunerError(f"importance {source}: layer {index} has no scores for {', '.join(missing)} "
                           f"(found {', '.join(sorted(tensors)) or 'nothing'})")
    for name, linear in modules.items():
        score = tensors[name]
        if score.shape != linear.weight.shape:
            raise DPrunerError(f"importance {source}: layer {index} {name} has shape {list(score.shape)}, "
                               f"the model's weight is {list(linear.weight.shape)}")
        bad = int((~torch.isfinite(score)).sum())
        if bad:
            raise DPrunerError(f"importance {source}: layer {index} {name} holds {bad} NaN/inf values; "
                               "scores must be finite")


def check_layer_count(scores: ScoreSet, num_layers: int) -> None:
    if scores.num_layers != num_layers:
        raise DPrunerError(f"importance {scores.folder} has scores for {scores.num_layers} layers, "
                           f"the model has {num_layers} decoder layers")


def layer_masks(scores: ScoreSet, index: int, modules: Mapping[str, nn.Linear], sparsity: float, scope: str,
                blocks: int, pattern: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Validate layer `index`'s scores against its projections and return their masks (True = pruned)."""
    tensors = scores.layer(index)
    check_layer_scores(scores.folder, index, tensors, modules)
    masks = {}
    for name in modules:
        try:
            masks[name] = select(tensors[name].to(device), sparsity, scope=scope, blocks=blocks, pattern=pattern)
        except DPrunerError as err:
            raise DPrunerError(f"layer {index} {name}: {err}") from None
    return masks


def apply_scores(model: nn.Module, scores: ScoreSet, sparsity: float, scope: str = "matrix",
                 blocks: int = DEFAULT_BLOCKS, pattern: str = "unstructured") -> dict[str, torch.Tensor]:
    """Zero the lowest-scoring weights of every projection; returns the masks (True = pruned, on CPU),
    keyed by parameter name (`model.layers.<i>.<module>.weight`).

    All masks are computed (and every score validated) before the first weight is touched.
    """
    check_options(sparsity, scope, blocks, pattern)
    layers = decoder_layers(model)
    check_layer_count(scores, len(layers))
    masks: dict[str, torch.Tensor] = {}
    targets: dict[str, nn.Linear] = {}
    for index, layer in enumerate(layers):
        modules = projection_modules(layer)
        device = next(iter(modules.values())).weight.device
        for name, mask in layer_masks(scores, index, modules, sparsity, scope, blocks, pattern, device).items():
            key = f"model.layers.{index}.{name}.weight"
            masks[key] = mask.cpu()
            targets[key] = modules[name]
    with torch.no_grad():
        for key, linear in targets.items():
            linear.weight.masked_fill_(masks[key].to(linear.weight.device), 0)
    return masks


def stored_dtype(config) -> str:
    """The checkpoint's own dtype (masking needs no arithmetic, so unpruned weights keep their exact
    bits; LLaMA-2 is fp16, as the original loads it); `auto` when the config does not say."""
    return _KEPT_DTYPES.get(getattr(config, "dtype", None), "auto")


def prune_from_scores(model_name: str, importance: str | Path, out: str | Path, *,
                      sparsity: float = DEFAULT_SPARSITY, scope: str = "matrix", blocks: int = DEFAULT_BLOCKS,
                      pattern: str = "unstructured", overwrite: bool = False, dtype: str = "auto",
                      device: str | None = None, offload: str = "auto",
                      allow_other_model: bool = False) -> dict[str, Any]:
    """Load the original model (or stream it layer by layer, `offload`), mask it with `importance`,
    save it with pruning_report.json."""
    check_options(sparsity, scope, blocks, pattern)
    out = check_output_dir(out, overwrite)
    protect([Output("output", out)], model_inputs(model_name, **{"importance folder": importance}))
    scores = ScoreSet.open(importance)
    check_same_model(scores.manifest, scores.folder, model_name, allow_other_model)
    handle = ModelHandle.resolve(model_name)
    check_layer_count(scores, check_model_structure(handle))
    if dtype == "auto":
        dtype = stored_dtype(handle.config)
    target = resolve_device(device)
    streamed = should_stream(offload, handle, resolve_dtype(dtype, target))

    began = time.time()
    tokenizer = handle.tokenizer
    if streamed:
        output = StreamedOutput(out, handle.checkpoint, resolve_dtype(dtype, target))
        try:
            masked, total = stream_masked_copy(handle, output, lambda index, modules: layer_masks(
                scores, index, modules, sparsity, scope, blocks, pattern, target))
        except BaseException:
            output.abort()
            raise
        stored = output.dtype
    else:
        model = handle.load(dtype, device=target)
        masks = apply_scores(model, scores, sparsity, scope=scope, blocks=blocks, pattern=pattern)
        masked = sum(int(mask.sum()) for mask in masks.values())
        total = sum(mask.numel() for mask in masks.values())
        stored = next(model.parameters()).dtype
    n_m = parse_pattern(pattern)
    report = {
        "method": "importance-mask",
        "base_model": model_name,
        "importance": {"folder": str(scores.folder), "layout": scores.layout, "manifest": scores.manifest},
        "mask": {"scope": "n:m" if n_m else scope, "blocks": blocks if scope == "block" and not n_m else None,
                 "pattern": pattern, "sparsity": n_m[0] / n_m[1] if n_m else sparsity,
                 "masked_weights": masked, "projection_weights": total},
        "dtype": str(stored).removeprefix("torch."),
        "offload": "disk" if streamed else "none",
        "seconds": round(time.time() - began, 2),
    }
    if streamed:
        output.finish(handle.config, tokenizer, report)
    else:
        save_pruned_model(model, tokenizer, out, report)
    sparsity_summary = json.loads((out / REPORT_NAME).read_text())["sparsity"]
    sparsity_summary.pop("per_layer")
    return {"pruned_model": str(out), "report": str(out / REPORT_NAME), "seconds": report["seconds"],
            "sparsity": sparsity_summary}


def build_parser(description: str, prog: str, scope: str) -> argparse.ArgumentParser:
    """The shared command line of save_model.py (scope `matrix`) and save_model_iterative.py (`block`)."""
    parser = cli.make_parser(description, prog=prog)
    parser.add_argument("model", help="the ORIGINAL pretrained model the scores were computed for: local Hugging "
                                      f"Face folder, hub id, or '{EMBEDDED_MODEL}' (the embedded model)")
    parser.add_argument("importance", help="score folder: ours (layer_XXX.safetensors + manifest.json) or the "
                                           "original's Q/K/V/O/Gate/Up/Down/<layer>.pt or q_proj/.../<layer>.pt")
    parser.add_argument("out", help="output Hugging Face model folder (written atomically)")
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                        help="fraction of each comparison group pruned, exactly int(n*sparsity) "
                             "(the original's percentile 52; 0.52 of the projections ~ 50%% of LLaMA-2-7B)")
    if scope == "block":
        parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS,
                            help="equal column blocks per matrix, each with its own threshold; must divide "
                                 "every projection's input size (original save_model_iterative.py: 32)")
    parser.add_argument("--pattern", default="unstructured",
                        help="unstructured, or N:M such as 2:4 / 4:8 (N lowest of every M consecutive inputs "
                             "in each row; overrides --sparsity%s; ours, not in the original)"
                             % (" and --blocks" if scope == "block" else ""))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(ALLOW_OPTION, action="store_true",
                        help="use the scores even if their manifest says they were computed for another model")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the checkpoint's stored dtype, e.g. fp16 for LLaMA-2 as the original "
                             "loads it), float32, bfloat16, float16")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda; unset: cuda if available (it only speeds up the sorting)")
    add_offload_option(parser)
    return parser


def main(argv: Sequence[str] | None, *, description: str, prog: str, scope: str) -> int:
    """Entry point of both stage-3 CLIs."""
    args = build_parser(description, prog, scope).parse_args(argv)
    cli.quiet_libraries()
    result = prune_from_scores(args.model, cli.resolve_out(args.importance), cli.resolve_out(args.out),
                               sparsity=args.sparsity, scope=scope, blocks=getattr(args, "blocks", DEFAULT_BLOCKS),
                               pattern=args.pattern, overwrite=args.overwrite, dtype=args.dtype, device=args.device,
                               offload=args.offload, allow_other_model=args.allow_other_model)
    sparsity = result["sparsity"]
    print(json.dumps(result))
    print(f"pruned model: {result['pruned_model']}")
    print(f"report: {result['report']}")
    print(f"sparsity: {sparsity['projection_sparsity']:.2%} of the {len(PROJECTIONS)} projections "
          f"({sparsity['zero_projection_weights']:,} of {sparsity['projection_weights']:,} weights), "
          f"{sparsity['overall_sparsity']:.2%} of all parameters "
          f"({sparsity['zero_parameters']:,} of {sparsity['all_parameters']:,})")
    return 0

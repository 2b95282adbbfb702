#!/usr/bin/env python3
"""Post-training pruning baselines behind one interface, written as a plain Hugging Face model folder
with pruning_report.json.

Methods (all layer by layer with sequential propagation, the 7 projections of every decoder layer):
  magnitude   smallest |W| per matrix (SparseGPT --gmp, Wanda's magnitude); data-free
  wanda       |W_ij| * ||X_j||_2, lowest of each output row (Sun et al., 2024); no weight update
  sparsegpt   OBS pruning with error compensation (Frantar & Alistarh, 2023)
  mixcal      SparseGPT with H = alpha*H_general + (1-alpha)*H_domain (cross-calibration, arXiv 2502.18424)
  dpruner     D-Pruner's precomputed scores (--scores: stage-2 output or any score folder); data-free
  dpruner-obs D-Pruner's dual-importance selection + SparseGPT's OBS compensation on the mixcal Hessian
              (ours; --scores, --selection mask|saliency|blend, --blend, --alpha; needs --calibration mix --domain D)
  llm-pruner  structured: whole attention heads / MLP channels by first-order Taylor group importance
              (--sparsity = fraction of parameters removed)
With --sparsity-profile owl every unstructured method gets one sparsity per decoder block from the
block's outlier ratio (OWL, Yin et al. 2024), averaging exactly --sparsity.

Calibration budget: --nsamples windows in total for every method. c4 draws them from C4, a domain (legal,
medical or a domain YAML path) from its calibration text (the stage-2 training strings, never test data),
mix half from C4 and half from --domain text (one pooled set; mixcal weighs the two halves with --alpha and needs mix).

Example: python code/prune_baseline.py wanda smollm2-135m outputs/wanda_2-4 --pattern 2:4 --nsamples 16 --seqlen 256
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

from dpruner import cli
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME, check_output_dir
from dpruner.guard import Output, model_inputs, protect
from dpruner.masks import parse_pattern
from dpruner.methods import get_method, method_names
from dpruner.methods.dpruner_obs import DEFAULT_BLEND, DEFAULT_SELECTION, SELECTIONS
from dpruner.methods.magnitude import SCOPES
from dpruner.methods.mixcal import DEFAULT_ALPHA
from dpruner.model_handle import ModelHandle
from dpruner.models import EMBEDDED_MODEL
from dpruner.obs import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP
from dpruner.owl import add_profile_options, profile_from_args
from dpruner.streaming import add_offload_option
from dpruner.pipeline import (CALIBRATION_HELP, CalibrationSpec, add_calibration_options, build_calibration,
                              calibration_from_args, check_model_structure, prune_with_method)
from dpruner.provenance import ALLOW_OPTION, check_same_model
from dpruner.stage3 import DEFAULT_BLOCKS, check_layer_count

STRUCTURED = "llm-pruner"
# The 50% unstructured setting of the SparseGPT and Wanda papers (and the ratio N:M patterns require there).
DEFAULT_SPARSITY = 0.5
# Options that only some methods read; giving them to another method is a mistake, not a no-op.
OBS_METHODS = ("sparsegpt", "mixcal", "dpruner-obs")
METHOD_OPTIONS = {"alpha": ("mixcal", "dpruner-obs"), "scores": ("dpruner", "dpruner-obs"),
                  "scope": ("magnitude", "wanda", "dpruner"), "selection": ("dpruner-obs",), "blend": ("dpruner-obs",)}
SPARSITY_TOLERANCE = 1e-9


def build_parser():
    parser = cli.make_parser(__doc__, prog="prune_baseline.py")
    parser.add_argument("method", choices=[*method_names(), STRUCTURED], help="pruning method")
    parser.add_argument("model", help=f"local Hugging Face folder, hub id, or '{EMBEDDED_MODEL}' (the embedded model)")
    parser.add_argument("out", help="output Hugging Face model folder (written atomically)")
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                        help="fraction of the projection weights pruned (SparseGPT/Wanda papers' 50%%); with an N:M "
                             f"--pattern it must equal N/M; for {STRUCTURED} the fraction of parameters removed")
    parser.add_argument("--pattern", default="unstructured",
                        help="unstructured, or N:M such as 2:4 / 4:8: N lowest of every M consecutive inputs in "
                             "each row (SparseGPT --prunen/--prunem, Wanda --sparsity_type)")
    parser.add_argument("--scope", choices=SCOPES, default=None,
                        help="comparison group of magnitude/wanda/dpruner; unset: the method's own (magnitude: "
                             "matrix as SparseGPT --gmp; wanda: row as the original; dpruner: matrix as save_model.py)")
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS,
                        help="equal column blocks of --scope block (original save_model_iterative.py: 32)")
    parser.add_argument("--calibration", default="c4",
                        help=f"calibration text: {CALIBRATION_HELP} (SparseGPT/Wanda: c4; a domain: its calibration "
                             "text, by default its stage-2 training strings); ignored by the data-free magnitude and "
                             "dpruner")
    parser.add_argument("--domain", default=None,
                        help="domain half of --calibration mix: legal (CaseHOLD + BillSum), medical (PubMedQA + HQS "
                             "training strings of stage 2), or a domain YAML path")
    add_calibration_options(parser)
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"mixcal: weight of the C4 Hessian, in [0, 1]; unset: {DEFAULT_ALPHA} "
                             "(ours: an even blend)")
    parser.add_argument("--selection", choices=SELECTIONS, default=None,
                        help="dpruner-obs: mask = fixed dual-importance mask per matrix, then OBS compensation; "
                             "saliency = dual importance ranks inside SparseGPT's sweep; blend = the geometric mean "
                             f"saliency^(1-b) * dual^b ranks there (--blend b) (default: {DEFAULT_SELECTION}, "
                             "chosen on validation text)")
    parser.add_argument("--blend", type=float, default=None,
                        help=f"dpruner-obs --selection blend: weight b of the dual importance, in [0, 1] (0 = mixcal, "
                             f"1 = --selection saliency); unset: {DEFAULT_BLEND} (ours)")
    parser.add_argument("--scores", default=None, metavar="DIR",
                        help="dpruner: score folder (stage-2 dual importance, or any --save-scores folder)")
    parser.add_argument(ALLOW_OPTION, action="store_true",
                        help="dpruner: use --scores even if their manifest says they were computed for another model")
    parser.add_argument("--blocksize", type=int, default=DEFAULT_BLOCKSIZE,
                        help="sparsegpt/mixcal: OBS column block (SparseGPT)")
    parser.add_argument("--percdamp", type=float, default=DEFAULT_PERCDAMP,
                        help="sparsegpt/mixcal: Hessian dampening, fraction of mean(diag H) (SparseGPT)")
    parser.add_argument("--save-scores", default=None, metavar="DIR",
                        help="also save what the method ranked by, per layer (usable as --scores or by save_model.py)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUT / --save-scores")
    parser.add_argument("--true-sequential", action="store_true",
                        help="prune k,v,q / o / up,gate / down in turn, re-collecting inputs (SparseGPT option)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (ours)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (fp32 on CPU, fp16 on CUDA as the originals), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_offload_option(parser)
    add_profile_options(parser)
    return parser


def check_arguments(args: Namespace) -> None:
    """Every check that needs neither the model weights nor the data."""
    cli.check_sparsity(args.sparsity)
    n_m = parse_pattern(args.pattern)
    if n_m and abs(args.sparsity - n_m[0] / n_m[1]) > SPARSITY_TOLERANCE:
        raise DPrunerError(f"--sparsity {args.sparsity} conflicts with --pattern {args.pattern}, which prunes exactly "
                           f"{n_m[0] / n_m[1]:g}; pass --sparsity {n_m[0] / n_m[1]:g}")
    if n_m and args.method in OBS_METHODS and args.blocksize % n_m[1]:
        raise DPrunerError(f"--blocksize {args.blocksize} must be a multiple of M={n_m[1]} "
                           f"for --pattern {args.pattern}")
    for option, methods in METHOD_OPTIONS.items():
        if getattr(args, option) is not None and args.method not in methods:
            raise DPrunerError(f"--{option} applies to {', '.join(methods)}, not {args.method}")
    if args.method in METHOD_OPTIONS["scores"] and args.scores is None:
        raise DPrunerError(f"method {args.method} needs --scores DIR (stage-2 output or another score folder)")
    if args.method == STRUCTURED:
        if n_m:
            raise DPrunerError(f"{STRUCTURED} removes whole heads and channels; --pattern must be unstructured")
        if args.save_scores:
            raise DPrunerError(f"--save-scores does not apply to {STRUCTURED}")
        if args.sparsity_profile != "uniform":
            raise DPrunerError(f"--sparsity-profile applies to the unstructured methods, not {STRUCTURED}")
        if args.offload == "disk":
            raise DPrunerError(f"--offload disk does not apply to {STRUCTURED} (it needs the whole model's gradients)")
    outputs = {"OUT": args.out, "--save-scores": args.save_scores, "--scores": args.scores}
    named = [(label, cli.resolve_out(path)) for label, path in outputs.items() if path]
    for i, (label, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if path == other_path or path in other_path.parents or other_path in path.parents:
                raise DPrunerError(f"{label} {path} and {other} {other_path} overlap; use separate folders")


def calibration_spec(args: Namespace) -> CalibrationSpec:
    spec = calibration_from_args(args, args.calibration, args.domain)
    spec.validate()
    return spec


def run_structured(args: Namespace, out: Path) -> dict:
    """LLM-Pruner-style structured pruning (dpruner.structured), on the same calibration windows."""
    from dpruner.structured import prune_structured

    spec = calibration_spec(args)
    check_output_dir(out, args.overwrite)
    protect([Output("OUT", out)], model_inputs(args.model, spec.data_dir))
    handle = ModelHandle.resolve(args.model)
    check_model_structure(handle)
    windows = build_calibration(spec, handle.tokenizer)
    return prune_structured(args.model, out, target_ratio=args.sparsity, calibration=windows,
                            overwrite=args.overwrite, dtype=args.dtype, device=args.device)


def method_options(args: Namespace) -> dict:
    """Constructor options of the chosen layer method, from the command line."""
    if args.method in OBS_METHODS:
        options = {"pattern": args.pattern, "blocksize": args.blocksize, "percdamp": args.percdamp}
        for option in ("alpha", "selection", "blend"):
            if getattr(args, option) is not None:
                options[option] = getattr(args, option)
        if args.method == "dpruner-obs":
            options["scores"] = cli.resolve_out(args.scores)
        return options
    options = {"pattern": args.pattern, "scope": args.scope, "blocks": args.blocks}
    if args.method == "dpruner":
        options["scores"] = cli.resolve_out(args.scores)
    return options


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    cli.quiet_libraries()
    out = cli.resolve_out(args.out)
    if args.method == STRUCTURED:
        print(json.dumps(run_structured(args, out)))
        print(f"pruned model: {out}")
        return 0

    method = get_method(args.method, sparsity=args.sparsity, **method_options(args))
    profile = profile_from_args(args)
    # The calibration spec (a domain YAML's rows included) is checked before the model is touched.
    calibration = calibration_spec(args) if method.statistic is not None or profile else None
    handle = ModelHandle.resolve(args.model)
    if args.method in METHOD_OPTIONS["scores"]:
        check_layer_count(method.score_set, check_model_structure(handle))
        check_same_model(method.score_set.manifest, method.score_set.folder, args.model, args.allow_other_model)
    result = prune_with_method(handle, method, calibration, scores_out=cli.resolve_out(args.save_scores),
                               save_pruned=out, overwrite=args.overwrite, dtype=args.dtype, device=args.device,
                               batch_size=args.batch_size, true_sequential=args.true_sequential,
                               kind=f"{args.method}_scores", offload=args.offload, profile=profile)
    sparsity = json.loads((out / REPORT_NAME).read_text())["sparsity"]
    print(json.dumps({k: result[k] for k in ("pruned_model", "scores", "seconds") if k in result}))
    print(f"pruned model: {out}")
    if "scores" in result:
        print(f"scores: {result['scores']}")
    print(f"sparsity: {sparsity['projection_sparsity']:.2%} of the projections, "
          f"{sparsity['overall_sparsity']:.2%} of all parameters")
    return 0


if __name__ == "__main__":
    cli.run(main)

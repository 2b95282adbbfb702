#!/usr/bin/env python3
"""Stage 1 of D-Pruner: general (open-domain) weight importance with SparseGPT's OBS sweep.

For every decoder layer, in order: collect H = 2/n sum x x^T for each of the 7 projections on C4
calibration windows, run the blocked OBS sweep at --sparsity inside each column block (with error
compensation), save the saliency w^2 / [chol(H^-1)]_jj^2 of every weight (fp32, weight shape), and feed
the pruned layer's outputs to the next layer. Scores: one safetensors per layer + manifest.json in --out.

Example: python code/general.py smollm2-135m c4 --sparsity 0.52 --nsamples 16 --seqlen 256
"""

from __future__ import annotations

import json

from dpruner import cli
from dpruner.methods import get_method
from dpruner.models import EMBEDDED_MODEL
from dpruner.obs import DEFAULT_BLOCKSIZE, DEFAULT_PERCDAMP
from dpruner.errors import DPrunerError
from dpruner.owl import add_profile_options, profile_from_args
from dpruner.pipeline import MIX, add_calibration_options, calibration_from_args, prune_with_method
from dpruner.streaming import add_offload_option

# The original general.py's default (0.52 of the 7 projections ~ 50% of all LLaMA-2-7B weights).
DEFAULT_SPARSITY = 0.52


def build_parser():
    parser = cli.make_parser(__doc__, prog="general.py")
    parser.add_argument("model", help=f"local Hugging Face folder, hub id, or '{EMBEDDED_MODEL}' (the embedded model)")
    parser.add_argument("dataset", help="calibration data: c4 (the original's only choice), or a domain (legal, medical, "
                                        "a domain YAML path: its calibration text, an ablation)")
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                        help="fraction pruned inside each column block during the sweep (original general.py default)")
    parser.add_argument("--blocksize", type=int, default=DEFAULT_BLOCKSIZE, help="OBS column block (SparseGPT)")
    parser.add_argument("--percdamp", type=float, default=DEFAULT_PERCDAMP,
                        help="Hessian dampening, fraction of mean(diag H) (SparseGPT)")
    add_calibration_options(parser)
    parser.add_argument("--out", default="outputs/general_importance", help="score folder (resumable)")
    parser.add_argument("--save-pruned", default=None, metavar="DIR",
                        help="also save the SparseGPT-pruned model here (our SparseGPT baseline)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --save-pruned")
    parser.add_argument("--true-sequential", action="store_true",
                        help="prune k,v,q / o / up,gate / down in turn, re-collecting inputs (SparseGPT option; off in the original)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass (ours; results do not depend on it beyond rounding)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA as the original), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_offload_option(parser)
    add_profile_options(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_sparsity(args.sparsity)
    if args.dataset == MIX:
        raise DPrunerError(f"calibration dataset {MIX} needs a second source; stage 1 takes c4 or one domain")
    cli.quiet_libraries()
    method = get_method("sparsegpt", sparsity=args.sparsity, blocksize=args.blocksize, percdamp=args.percdamp)
    calibration = calibration_from_args(args, args.dataset)
    result = prune_with_method(args.model, method, calibration, scores_out=cli.resolve_out(args.out),
                               save_pruned=cli.resolve_out(args.save_pruned), overwrite=args.overwrite,
                               dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                               true_sequential=args.true_sequential, kind="general_importance",
                               offload=args.offload, profile=profile_from_args(args))
    print(json.dumps({k: result[k] for k in ("scores", "pruned_model", "seconds") if k in result}))
    print(f"general importance: {result['scores']}")
    if "pruned_model" in result:
        print(f"SparseGPT-pruned model: {result['pruned_model']}")
    return 0


if __name__ == "__main__":
    cli.run(main)

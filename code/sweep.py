#!/usr/bin/env python3
"""Sweeps: domain quality against sparsity for several pruning methods (`sparsity`), or against D-Pruner's
stage-2 regularizer weight lambda (`lambda`: stage 2 per regularizer form and lambda, then save_model.py
per sparsity; lambda = 0 is one run without a regularizer, shared by every form).

Every point is pruned and evaluated by this project's CLIs run as subprocesses (prune_baseline.py /
train_lomo.py + save_model.py, then the evaluation CLIs), so a point is exactly what you would run by hand.
Each point gets domain perplexity, the domain's multiple-choice accuracy (CaseHOLD / PubMedQA) and
WikiText-2 perplexity; the dense model is evaluated once as the reference row.

Writes to --out: results.csv (one row per point, rewritten after each), table.md (paper-style, % of dense),
pareto.png (domain ppl and accuracy against sparsity, the Pareto front of high sparsity / low ppl circled),
eval/<point>/<task>.json, reports/<point>.json (pruning reports), logs/<point>.log, recipes/<point>.json;
the lambda sweep adds each point's mask Jaccard against lambda = 0 (jaccard/<point>.json, a results.csv
column) and tradeoff.png (domain ppl against general ppl, one curve per form through its lambdas, with 95 %
intervals).
A rerun resumes: finished points are reused, and one recorded with other settings is an error (--fresh
starts over; the lists of methods, forms, sparsities and lambdas may change). The results cover every finished
point of the folder that this call's settings would compute the same way, so forms can be swept in separate
calls, each on its own lambda grid; earlier points of other settings are named and left out. Pruned models
(540 MB each for the embedded model) are deleted after their evaluation unless --keep-models.

Examples:
  python code/sweep.py sparsity smollm2-135m --domain legal --methods magnitude,wanda,sparsegpt,dpruner \\
      --sparsities 0.1,0.3,0.5,0.7 --scores outputs/legal/lomo/importance --out outputs/sweeps/legal-sparsity
  python code/sweep.py lambda smollm2-135m --domain legal --lambdas 0,0.01,0.1,1 --sparsity 0.5 \\
      --general-importance outputs/legal/general_importance --out outputs/sweeps/legal-lambda
  python code/sweep.py lambda smollm2-135m --domain legal --split validation --lambdas 0,0.1,10,1000 \\
      --forms anchor,squared_grad --general-importance outputs/quickstart/general_importance \\
      --out outputs/sweeps/legal-lambda-validation   # + mask_jaccard_vs_lambda0 and tradeoff.png
"""

from __future__ import annotations

import shlex
import sys
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

from dpruner import cli
from dpruner.config import DOMAINS
from dpruner.data.calibration import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from dpruner.models import EMBEDDED_MODEL
from dpruner.owl import PROFILES
from dpruner.sweep import (PLOT, RESULTS_CSV, SPARSITY_METHODS, SPLITS, EvalSettings, SweepConfig, parse_list,
                           run_sweep)


def build_parser():
    parser = cli.make_parser(__doc__, prog="sweep.py")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{sparsity,lambda}")
    sparsity = kinds.add_parser("sparsity", help="several methods at several sparsities",
                                formatter_class=cli.HelpFormatter, description=__doc__)
    lam = kinds.add_parser("lambda", help="stage 2 at several lambdas, then masks at --sparsity",
                           formatter_class=cli.HelpFormatter, description=__doc__)
    for sub in (sparsity, lam):
        sub.add_argument("model", help=f"local Hugging Face folder, hub id, or '{EMBEDDED_MODEL}' (the embedded model)")
        sub.add_argument("--domain", choices=DOMAINS, required=True, help="which domain's evaluations (and stage 2)")
        sub.add_argument("--out", required=True, help="sweep folder (resumed when rerun)")
        sub.add_argument("--split", choices=SPLITS, default="test",
                         help="test: the paper's metrics; validation: the domain's validation text, WikiText-2 "
                              "validation and held-out C4 (choose hyperparameters here, never on test)")
    sparsity.add_argument("--methods", default="magnitude,wanda,sparsegpt,dpruner",
                          help=f"comma-separated prune_baseline.py methods: {', '.join(SPARSITY_METHODS)}")
    sparsity.add_argument("--sparsities", "--sparsity", default="0.1,0.3,0.5,0.7",
                          help="comma-separated fractions of the 7 projections pruned, each in [0, 1)")
    sparsity.add_argument("--scores", default=None, metavar="DIR",
                          help="D-Pruner's importance folder (stage-2 OUT/lomo/importance); required with dpruner, "
                               "dpruner-obs and dpruner-obs-saliency (its dual mask / ranking + OBS compensation)")
    sparsity.add_argument("--blends", default="0.5",
                          help="comma-separated weights of the dual importance in dpruner-obs-blend's ranking, each in "
                               "[0, 1] (one point per value; 0 = mixcal, 1 = dpruner-obs-saliency)")
    sparsity.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES,
                          help="calibration windows of wanda / sparsegpt / mixcal (C4; mixcal: half domain text)")
    sparsity.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN, help="tokens per calibration window")
    sparsity.add_argument("--sparsity-profile", choices=PROFILES, default="uniform",
                          help="prune_baseline.py --sparsity-profile for every method (owl: OWL block sparsities)")
    lam.add_argument("--lambdas", default="0,0.01,0.1,1", help="comma-separated regularizer weights, each >= 0")
    lam.add_argument("--forms", default="anchor",
                     help="comma-separated stage-2 regularizer forms, each run at every lambda but 0: "
                          "anchor, grad_penalty, squared_grad, upstream (dpruner.importance)")
    lam.add_argument("--sparsity", "--sparsities", dest="sparsities", default="0.5",
                     help="comma-separated sparsities the masks are saved at (stage 2 runs once per lambda)")
    lam.add_argument("--general-importance", required=True, metavar="DIR", help="stage-1 output (code/general.py)")
    lam.add_argument("--train-args", default="",
                     help="extra stage-2 key=value overrides, e.g. \"casehold_examples=32 data_max_length=256\"")
    lam.add_argument("--launcher", default="python",
                     help="stage-2 launcher: python (one process; ZeRO-3 if the config names DeepSpeed), or e.g. "
                          "\"deepspeed --num_gpus 8 --master_port 6010\"")
    defaults = EvalSettings()
    for sub in (sparsity, lam):
        evaluation = sub.add_argument_group("evaluation (cheap defaults: the --quick pipeline's, 200 choice rows)")
        evaluation.add_argument("--ppl-limit", type=int, default=defaults.ppl_limit, help="domain perplexity texts")
        evaluation.add_argument("--ppl-max-length", type=int, default=defaults.ppl_max_length,
                                help="domain perplexity window (tokens)")
        evaluation.add_argument("--ppl-stride", type=int, default=defaults.ppl_stride,
                                help="domain perplexity stride (tokens)")
        evaluation.add_argument("--choice-limit", type=int, default=defaults.choice_limit,
                                help="CaseHOLD / PubMedQA rows")
        evaluation.add_argument("--wiki-limit", type=int, default=defaults.wiki_limit, help="WikiText-2 test rows")
        evaluation.add_argument("--wiki-seqlen", type=int, default=defaults.wiki_seqlen,
                                help="WikiText-2 window (tokens)")
        evaluation.add_argument("--batch-size", type=int, default=8,
                                help="evaluation batch size (results do not depend on it beyond rounding)")
        sub.add_argument("--keep-models", action="store_true", help="keep each point's pruned model folder")
        sub.add_argument("--fresh", action="store_true", help="delete the sweep folder's results and start over")
    return parser


def to_config(args: Namespace) -> SweepConfig:
    """The library's sweep description; local paths become absolute so a rerun from elsewhere matches."""
    model = str(cli.resolve_out(args.model)) if Path(args.model).expanduser().exists() else args.model
    evaluation = EvalSettings(args.ppl_limit, args.ppl_max_length, args.ppl_stride, args.choice_limit,
                              args.wiki_limit, args.wiki_seqlen)
    common = dict(kind=args.kind, model=model, domain=args.domain, out=cli.resolve_out(args.out),
                  sparsities=parse_list(args.sparsities, "--sparsities", number=True), evaluation=evaluation,
                  batch_size=args.batch_size, keep_models=args.keep_models, fresh=args.fresh, split=args.split)
    if args.kind == "sparsity":
        return SweepConfig(**common, methods=parse_list(args.methods, "--methods"),
                           blends=parse_list(args.blends, "--blends", number=True),
                           scores=cli.resolve_out(args.scores), nsamples=args.nsamples, seqlen=args.seqlen,
                           sparsity_profile=args.sparsity_profile)
    launcher = [sys.executable] if args.launcher == "python" else shlex.split(args.launcher)
    return SweepConfig(**common, lambdas=parse_list(args.lambdas, "--lambdas", number=True),
                       forms=parse_list(args.forms, "--forms"),
                       general_importance=cli.resolve_out(args.general_importance),
                       train_args=shlex.split(args.train_args), launcher=launcher)


def main(argv: Sequence[str] | None = None) -> int:
    config = to_config(build_parser().parse_args(argv))
    rows = run_sweep(config)
    print(f"{len(rows)} points -> {config.out / RESULTS_CSV}, plot {config.out / PLOT}")
    return 0


if __name__ == "__main__":
    cli.run(main)

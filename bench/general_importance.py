#!/usr/bin/env python3
"""Stage 1 (SparseGPT + saving every saliency) vs a prune-only SparseGPT pass: time and peak memory.

Both variants run the same model, calibration windows and solver in fresh processes, alternated
`--repeats` times; the script prints medians and the ratios stage1 / prune-only
(targets: time <= 1.05x, peak memory <= 1.0x).

  python bench/general_importance.py [--model smollm2-135m] [--nsamples 16] [--seqlen 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import interleaved, median, peak_rss_mb  # noqa: E402


def child(args) -> None:
    from dpruner.cli import quiet_libraries
    from dpruner.methods import get_method
    from dpruner.pipeline import CalibrationSpec, prune_with_method

    quiet_libraries()
    method = get_method("sparsegpt", sparsity=0.52)
    spec = CalibrationSpec(nsamples=args.nsamples, seqlen=args.seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.time()
        result = prune_with_method(args.model, method, spec, scores_out=Path(tmp) / "scores" if args.mode == "stage1" else None,
                                   save_pruned=None, kind="general_importance")
        wall = time.time() - began
    print(json.dumps({"mode": args.mode, "seconds": result["seconds"], "wall": wall, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("stage1", "prune_only"), default="stage1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    common = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    runs = interleaved(__file__, {m: [*common, "--mode", m] for m in ("stage1", "prune_only")}, args.repeats)
    print(f"model {args.model}, {args.nsamples} x {args.seqlen} C4 windows, sparsity 0.52, {args.repeats} runs each (medians)")
    for mode in runs:
        print(f"  {mode:10s}  time {median(runs[mode], 'seconds'):7.1f} s   peak RSS {median(runs[mode], 'peak_rss_mb'):7.0f} MB")
    t = median(runs["stage1"], "seconds") / median(runs["prune_only"], "seconds")
    m = median(runs["stage1"], "peak_rss_mb") / median(runs["prune_only"], "peak_rss_mb")
    print(f"ratio stage1 / prune-only: time {t:.3f}x (target <= 1.05), peak memory {m:.3f}x (target <= 1.0)")


if __name__ == "__main__":
    main()

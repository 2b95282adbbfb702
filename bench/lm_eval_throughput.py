#!/usr/bin/env python3
"""Throughput of our choice evaluator against lm-evaluation-harness on the same task, as a ratio.

Both score the same CaseHOLD rows (config/lm_eval_tasks/casehold_local.yaml = code/test_casehold.py's
prompt) with the same model object; the script first checks that their summed candidate log-likelihoods
agree. lm-eval's time is its whole `simple_evaluate` call (task set-up, requests, metrics), which is what
a user pays; ours is `score_choices`. The two sides alternate `--repeat` times; each keeps its fastest.

Example: python bench/lm_eval_throughput.py --rows 20 --repeat 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dpruner.data import eval_sets
from dpruner.evaluation import lm_eval_bridge
from dpruner.evaluation.choice import score_choices
from dpruner.models import EMBEDDED_MODEL, load_model, load_tokenizer

TASK = "casehold_local"
# Agreement we require of the summed log-likelihoods (fp32; the two differ in batching and kernel shapes).
LL_RTOL, LL_ATOL = 1e-4, 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=5, help="candidates (ours) / requests (lm-eval) per pass")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32", device=args.device)
    examples = eval_sets.casehold(limit=args.rows).items
    best = {"ours": float("inf"), "lm-eval": float("inf")}
    with lm_eval_bridge.local_task_dir() as include:
        manager = lm_eval_bridge.task_manager(include, [TASK])
        for _ in range(args.repeat):
            began = time.perf_counter()
            ours = score_choices(model, tokenizer, examples, batch_size=args.batch_size, progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - began)
            began = time.perf_counter()
            theirs = lm_eval_bridge.run_lm_eval(model, tokenizer, [TASK], manager, limit=args.rows,
                                                batch_size=args.batch_size, log_samples=True)
            best["lm-eval"] = min(best["lm-eval"], time.perf_counter() - began)
    samples = sorted(theirs["samples"][TASK], key=lambda s: s["doc_id"])
    np.testing.assert_allclose(np.asarray(ours.summed()), [[ll for ll, _ in s["filtered_resps"]] for s in samples],
                               rtol=LL_RTOL, atol=LL_ATOL)
    print(f"model {args.model}, device {next(model.parameters()).device}, torch threads {torch.get_num_threads()}, "
          f"{TASK} {len(examples)} rows x 5 candidates, batch {args.batch_size}; log-likelihoods agree")
    for name, seconds in best.items():
        print(f"  {name:8s} {seconds:8.2f} s  {len(examples) / seconds:7.2f} rows/s")
    print(f"ours / lm-eval throughput ratio: {best['lm-eval'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()

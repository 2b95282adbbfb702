#!/usr/bin/env python3
"""Evaluate a pruned model with lm-evaluation-harness (0.4.x), through HFLM(pretrained=model).

Local tasks (offline, from config/lm_eval_tasks/): casehold_local, pubmedqa_local. Any lm-eval task name
works when online, e.g. the zero-shot set Wanda and the seed-002 thesis report:
  python code/evaluate_lm_eval.py smollm2-135m outputs/pruned --tasks boolq,arc_easy,arc_challenge,hellaswag,winogrande,openbookqa
  python code/evaluate_lm_eval.py smollm2-135m outputs/pruned --tasks casehold_local --limit 20

The tokenizer comes from BASE, the weights from PRUNED (pass BASE twice for the dense model). Writes
lm-eval's results (and its configs and versions) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

from dpruner import cli
from dpruner.errors import DPrunerError

DEFAULT_OUT = "outputs/eval/lm_eval-{name}.json"


def build_parser() -> argparse.ArgumentParser:
    from dpruner.models import EMBEDDED_MODEL

    parser = cli.make_parser(__doc__, prog="evaluate_lm_eval.py")
    parser.add_argument("base_model", help=f"model giving the tokenizer: a folder, hub id, or '{EMBEDDED_MODEL}'")
    parser.add_argument("pruned_model", help="Hugging Face folder of the model to evaluate")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval's few-shot count (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per forward pass")
    parser.add_argument("--out", default=None,
                        help=f"result JSON (default: {DEFAULT_OUT.format(name='<model folder>')})")
    parser.add_argument("--data-dir", default=None, help="prepared data root for the local tasks "
                                                         "(default: legal_pruning_data/data)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser


def main(argv=None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise DPrunerError("--tasks is empty; expected comma-separated lm-eval task names")
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DPrunerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise DPrunerError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    cli.quiet_libraries()
    from dpruner.evaluation import lm_eval_bridge
    from dpruner.evaluation.runner import load_models
    from dpruner.export import versions
    from dpruner.io import write_json

    out = cli.resolve_out(args.out or DEFAULT_OUT.format(name=Path(args.pruned_model.rstrip("/")).name or "model"))
    with lm_eval_bridge.local_task_dir(args.data_dir) as include:
        manager = lm_eval_bridge.task_manager(include, tasks)
        lm_eval_bridge.check_tasks(tasks, manager)
        loaded = load_models(args)
        result = lm_eval_bridge.run_lm_eval(loaded.model, loaded.tokenizer, tasks, manager, limit=args.limit,
                                            batch_size=args.batch_size, num_fewshot=args.num_fewshot)
    record = {"tasks": tasks, "models": loaded.paths, "sparsity": loaded.sparsity,
              "results": result["results"], "configs": result.get("configs", {}), "n-samples": result.get("n-samples"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("base_model", "pruned_model")},
              "versions": {**versions(), "lm_eval": version("lm_eval")},
              "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - started, 3)}
    write_json(out, record)
    for task, metrics in result["results"].items():
        shown = ", ".join(f"{key.split(',')[0]} {value:.4f}" for key, value in metrics.items()
                          if isinstance(value, float) and "stderr" not in key)
        print(f"{task}: {shown}")
    print(f"-> {out} ({record['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    cli.run(main)

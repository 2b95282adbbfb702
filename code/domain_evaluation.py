#!/usr/bin/env python3
"""Any evaluation of any domain spec: --domain (legal, medical, or a domain YAML path) and --task (its
perplexity text, `perplexity`, or one of its tasks). Same options, checks and result files as the
per-task CLIs (test_casehold.py is `--domain legal --task casehold`); the default result name is
<domain>_perplexity or the task name.

Example: python code/domain_evaluation.py smollm2-135m outputs/pruned --domain examples/domains/python-code.yaml \
    --task perplexity --limit 5 --max-length 256 --stride 128
"""

from __future__ import annotations

import argparse

from dpruner import cli
from dpruner.data.eval_sets import PERPLEXITY
from dpruner.data.spec import load_domain
from dpruner.evaluation import runner

# Forward passes per batch: windows (perplexity), candidates of one example, prompts (generation).
BATCH_SIZE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, help="legal, medical, or a domain YAML path")
    parser.add_argument("--task", default=PERPLEXITY, help=f"{PERPLEXITY} or a task of the domain's spec")
    parser.add_argument("--file", default=None, help="replace the task's data file (a task whose data you supply)")
    parser.add_argument("--list-tasks", action="store_true",
                        help="print the domain's tasks that have data (task, result name, family) and exit")


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--domain", default="legal")
    pre.add_argument("--task", default=PERPLEXITY)
    pre.add_argument("--list-tasks", action="store_true")
    picked, _ = pre.parse_known_args(argv)
    if picked.list_tasks:  # for scripts/pipeline.sh: one "TASK RESULT_NAME FAMILY" line per task it can run
        spec = load_domain(picked.domain)
        for name in spec.task_names(available_only=True):
            family = "perplexity" if name == PERPLEXITY else spec.tasks[name].type
            print(name, spec.result_name(name), family)
        return 0
    task = runner.spec_task(picked.domain, picked.task, BATCH_SIZE, add_arguments=add_arguments)
    return runner.main(task, __doc__, argv, prog="domain_evaluation.py")


if __name__ == "__main__":
    cli.run(main)

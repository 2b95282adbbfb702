#!/usr/bin/env python3
"""BillSum: 200 test bills, prompt "A bill text is '...'. The summary of the bill is '", the original's
sampling (T=0.1, top-k 50, top-p 1.0, repetition penalty 1.1, up to 1000 new tokens; --greedy for
deterministic output), first line of the new text kept. ROUGE-1/2/L/Lsum F1 (rouge-score, stemming);
predictions and per-example scores go to <out>.examples.jsonl.

Example: python code/test_billsum.py smollm2-135m outputs/pruned --limit 20 --greedy
"""

from dpruner import cli
from dpruner.evaluation import runner

TASK = runner.spec_task("legal", "billsum", batch_size=8)  # config/domains/legal.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_billsum.py")


if __name__ == "__main__":
    cli.run(main)

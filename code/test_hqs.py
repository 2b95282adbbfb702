#!/usr/bin/env python3
"""HQS (MEDIQA 2021 question summarization): 100 test questions, prompt "A question posted by a patient
is '...'. The summary of the question is '", BillSum's decoding and first-line rule, ROUGE-1/2/L/Lsum F1.

Example: python code/test_hqs.py smollm2-135m outputs/pruned --greedy
"""

from dpruner import cli
from dpruner.evaluation import runner

TASK = runner.spec_task("medical", "hqs", batch_size=8)  # config/domains/medical.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_hqs.py")


if __name__ == "__main__":
    cli.run(main)

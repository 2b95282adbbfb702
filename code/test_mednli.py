#!/usr/bin/env python3
"""MedNLI: a MedNLI JSONL file you supply (sentence1, sentence2, gold_label; credentialed, not shipped),
candidates entailment / contradiction / neutral scored by mean log-probability after "Premise is '...',
and hypothesis is '...'. Their relationship is '", the CaseHOLD scorer. Accuracy, macro-F1.
--limit N takes N rows evenly spaced over the file (safe for label-sorted files).

Example: python code/test_mednli.py smollm2-135m outputs/pruned mli_test_v1.jsonl
"""

from dpruner import cli
from dpruner.evaluation import runner


def add_arguments(parser) -> None:
    parser.add_argument("file", nargs="?", help="MedNLI JSONL, e.g. mli_test_v1.jsonl from PhysioNet")


TASK = runner.spec_task("medical", "mednli", batch_size=12, add_arguments=add_arguments)  # config/domains/medical.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_mednli.py")


if __name__ == "__main__":
    cli.run(main)

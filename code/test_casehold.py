#!/usr/bin/env python3
"""CaseHOLD: 200 test rows, 5 candidate holdings each, scored by the mean log-probability of the
candidate's tokens after "A citing text is '...'. The correct holding statement is" (no BOS), as the
original test_casehold.py. Reports accuracy and macro-F1; per-example scores go to <out>.examples.jsonl.

Example: python code/test_casehold.py smollm2-135m outputs/pruned --limit 20
"""

from dpruner import cli
from dpruner.evaluation import runner

TASK = runner.spec_task("legal", "casehold", batch_size=16)  # config/domains/legal.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_casehold.py")


if __name__ == "__main__":
    cli.run(main)

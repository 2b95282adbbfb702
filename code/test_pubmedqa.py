#!/usr/bin/env python3
"""PubMedQA: the 500 PQA-L test rows, candidates 'yes' / 'no' / 'maybe' scored by mean log-probability
after the training template's prefix ("... The answer is '"), the CaseHOLD scorer. Accuracy, macro-F1.
The test file is sorted by answer, so --limit N takes N rows evenly spaced over it (not the first N).

Example: python code/test_pubmedqa.py smollm2-135m outputs/pruned --limit 50
"""

from dpruner import cli
from dpruner.evaluation import runner

TASK = runner.spec_task("medical", "pubmedqa", batch_size=12)  # config/domains/medical.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_pubmedqa.py")


if __name__ == "__main__":
    cli.run(main)

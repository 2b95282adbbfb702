#!/usr/bin/env python3
"""PubMedQA: the 500 PQA-L test rows, candidates 'yes' / 'no' / 'maybe' scored by mean log-probability
after the training template's prefix ("... The answer is '"), the CaseHOLD scorer. Accuracy, macro-F1.
The test file is sorted by answer, so --limit N takes N rows evenly spaced over it (not the first N).

Example: python code/test_pubmedqa.py smollm2-135m outputs/pruned --limit 50
"""

from dpruner import cli
from dpruner.data import eval_sets
from dpruner.evaluation import runner

TASK = runner.Task("pubmedqa", "choice", lambda args: eval_sets.pubmedqa(args.data_dir, args.limit),
                   limit=eval_sets.PUBMEDQA_TEST_ROWS, batch_size=12)


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="test_pubmedqa.py")


if __name__ == "__main__":
    cli.run(main)

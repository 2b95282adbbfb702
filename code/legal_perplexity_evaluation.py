#!/usr/bin/env python3
"""Legal perplexity: the 300 MultiLegalPile US-legislation texts joined by blank lines, tokenized once,
2048-token windows every 512 tokens, each scoring only its new tokens (the original's HF recipe).
Reports the original's exp(mean window loss) and the token-weighted perplexity.

Example: python code/legal_perplexity_evaluation.py smollm2-135m outputs/pruned --limit 20 --max-length 512
"""

from dpruner import cli
from dpruner.data.eval_sets import PERPLEXITY
from dpruner.evaluation import runner

TASK = runner.spec_task("legal", PERPLEXITY, batch_size=4)  # config/domains/legal.yaml


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="legal_perplexity_evaluation.py")


if __name__ == "__main__":
    cli.run(main)

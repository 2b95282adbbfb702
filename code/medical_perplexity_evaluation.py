#!/usr/bin/env python3
"""Medical perplexity, same protocol as the legal one (2048-token windows, stride 512). The paper used 300
Harrison textbook paragraphs, which are not redistributable: pass them with --text-file. The default text
is the abstracts (" ".join(CONTEXTS)) of the first 300 PubMedQA rows outside the test set.

Example: python code/medical_perplexity_evaluation.py smollm2-135m outputs/pruned --text-file harrison.txt
"""

from dpruner import cli
from dpruner.data import eval_sets
from dpruner.evaluation import runner
from dpruner.evaluation.perplexity import DEFAULT_MAX_LENGTH, DEFAULT_STRIDE


def load(args):
    if args.text_file:
        return eval_sets.text_file(args.text_file, args.limit)
    return eval_sets.pubmedqa_abstracts(args.data_dir, args.limit)


def add_arguments(parser) -> None:
    parser.add_argument("--text-file", default=None,
                        help="your medical text: JSONL rows with 'text', or a .txt file of paragraphs")


TASK = runner.Task("medical_perplexity", "perplexity", load, limit=eval_sets.MEDICAL_PPL_TEXTS, batch_size=4,
                   max_length=DEFAULT_MAX_LENGTH, stride=DEFAULT_STRIDE, add_arguments=add_arguments)


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="medical_perplexity_evaluation.py")


if __name__ == "__main__":
    cli.run(main)

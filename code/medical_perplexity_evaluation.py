#!/usr/bin/env python3
"""Medical perplexity, same protocol as the legal one (2048-token windows, stride 512). The paper used 300
Harrison textbook paragraphs, which are not redistributable: pass them with --text-file. The default text
(config/domains/medical.yaml) is the last 300 consumer health questions of HQS_train.jsonl, which no
training, calibration or test set reads (docs/DEVIATIONS.md).

Example: python code/medical_perplexity_evaluation.py smollm2-135m outputs/pruned --text-file harrison.txt
"""

from dpruner import cli
from dpruner.data import eval_sets
from dpruner.data.spec import load_domain
from dpruner.evaluation import runner


def load(args):
    if args.text_file:
        return eval_sets.text_file(args.text_file, args.limit)
    return eval_sets.task_set(load_domain("medical"), eval_sets.PERPLEXITY, args.data_dir, args.limit)


def add_arguments(parser) -> None:
    parser.add_argument("--text-file", default=None,
                        help="your medical text: JSONL rows with 'text', or a .txt file of paragraphs")


TASK = runner.spec_task("medical", eval_sets.PERPLEXITY, batch_size=4, add_arguments=add_arguments, load=load)


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="medical_perplexity_evaluation.py")


if __name__ == "__main__":
    cli.run(main)

#!/usr/bin/env python3
"""General perplexity with the SparseGPT/Wanda protocol: WikiText-2 test (rows joined by blank lines) and
C4 validation (the first 1100 documents joined by spaces, first 256 windows), non-overlapping windows of
--max-length (seqlen, default 2048; Wanda uses 4096 for LLaMA-2), ppl = exp(mean window loss).
Offline, C4 is the 30 OLMo C4 documents held out of calibration; --c4-source hub reads SparseGPT's shard.
`wikitext2_validation` is WikiText-2's validation split, for choosing hyperparameters (never on test).

Example: python code/general_perplexity_evaluation.py smollm2-135m outputs/pruned --datasets wikitext2
"""

from dpruner import cli
from dpruner.data import eval_sets
from dpruner.evaluation import runner
from dpruner.evaluation.perplexity import DEFAULT_MAX_LENGTH

DATASETS = ("wikitext2", "c4", "wikitext2_validation")
DEFAULT_DATASETS = ("wikitext2", "c4")


def load(args):
    loaders = {"wikitext2": lambda: eval_sets.wikitext2(args.data_dir, args.limit),
               "wikitext2_validation": lambda: eval_sets.wikitext2(args.data_dir, args.limit, "validation"),
               "c4": lambda: eval_sets.c4_validation(args.data_dir, args.limit, args.c4_source)}
    sets = [loaders[name]() for name in args.datasets]
    return eval_sets.EvalSet([c for s in sets for c in s.items], [src for s in sets for src in s.sources])


def add_arguments(parser) -> None:
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DEFAULT_DATASETS),
                        help="texts to evaluate")
    parser.add_argument("--c4-source", choices=("local", "hub"), default="local",
                        help="local: 30 held-out C4 documents (offline); hub: allenai/c4 validation shard 0 (SparseGPT)")


TASK = runner.Task("general_perplexity", "perplexity", load, limit=None, batch_size=4,
                   max_length=DEFAULT_MAX_LENGTH, add_arguments=add_arguments)


def main(argv=None) -> int:
    return runner.main(TASK, __doc__, argv, prog="general_perplexity_evaluation.py")


if __name__ == "__main__":
    cli.run(main)

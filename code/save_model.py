#!/usr/bin/env python3
"""Stage 3 of D-Pruner, "without iterative blocking": one threshold per weight matrix.

Loads the ORIGINAL pretrained model, prunes in each of the 7 projections (q, k, v, o, gate, up, down
of every decoder layer) the exactly int(n * sparsity) weights with the lowest importance (ties: the
earlier position first), and saves a Hugging Face folder (safetensors) with pruning_report.json.
Embeddings, norms and lm_head are never pruned.

Example: python code/save_model.py smollm2-135m outputs/importance/4 outputs/pruned_matrix
"""

from __future__ import annotations

from collections.abc import Sequence

from dpruner import cli, stage3


def main(argv: Sequence[str] | None = None) -> int:
    return stage3.main(argv, description=__doc__, prog="save_model.py", scope="matrix")


if __name__ == "__main__":
    cli.run(main)

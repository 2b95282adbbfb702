#!/usr/bin/env python3
"""Stage 3 of D-Pruner, "with iterative blocking": one threshold per column block.

Loads the ORIGINAL pretrained model, splits the input dimension of each of the 7 projections (q, k, v,
o, gate, up, down of every decoder layer) into --blocks equal column blocks, prunes in each block
(all rows x block columns) exactly int(n * sparsity) weights with the lowest importance (ties: the
earlier position first), and saves a Hugging Face folder (safetensors) with pruning_report.json.
Embeddings, norms and lm_head are never pruned.

Example: python code/save_model_iterative.py smollm2-135m outputs/importance/4 outputs/pruned_blocks
"""

from __future__ import annotations

from collections.abc import Sequence

from dpruner import cli, stage3


def main(argv: Sequence[str] | None = None) -> int:
    return stage3.main(argv, description=__doc__, prog="save_model_iterative.py", scope="block")


if __name__ == "__main__":
    cli.run(main)

#!/usr/bin/env python3
"""Mask analysis: sparsity per layer and projection, and Jaccard overlap between pruning masks.

Each source is LABEL=PATH. PATH is a pruned Hugging Face model folder (safetensors; its mask is the
weights that are exactly 0 in the 7 projections of every decoder layer) or a score folder (ours, or the
original's .pt layouts; its mask is derived with --sparsity/--scope/--blocks/--pattern exactly as stage 3
does). Compare methods (model x model), domains (legal vs medical scores), or stage-1 general scores vs
stage-2 dual scores. Layers are read one at a time, so 7B models need no more than one layer per source
in memory.

Writes to --out: sparsity.csv, jaccard.csv (rows per layer x projection, `all` rows pooled over layers
and/or projections, and the Jaccard expected for independent random masks of the same sparsities),
sparsity_heatmap_<label>.png, jaccard_heatmap.png, jaccard_by_layer.png (2+ sources) and summary.json.

Example: python code/analyze_masks.py legal=outputs/importance/legal medical=outputs/importance/medical \\
             general=outputs/general_importance pruned=outputs/pruned_matrix --sparsity 0.52
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dpruner import cli
from dpruner.analysis import SCOPES, MaskOptions, check_output, count_masks, open_sources, write_outputs

DEFAULT_OUT = "outputs/mask_analysis"


def build_parser():
    defaults = MaskOptions()
    parser = cli.make_parser(__doc__, prog="analyze_masks.py")
    parser.add_argument("sources", nargs="+", metavar="LABEL=PATH",
                        help="labelled model or score folders; labels name the output files "
                             "(letters, digits, . _ + -)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (written as a whole at the end)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--sparsity", type=float, default=defaults.sparsity,
                        help="score folders only: fraction of each comparison group pruned, exactly int(n*sparsity)")
    parser.add_argument("--scope", choices=SCOPES, default=defaults.scope,
                        help="score folders only: comparison group of one threshold: the whole matrix "
                             "(save_model.py), column blocks (save_model_iterative.py), or each row (Wanda)")
    parser.add_argument("--blocks", type=int, default=defaults.blocks,
                        help="score folders, --scope block: equal column blocks per matrix")
    parser.add_argument("--pattern", default=defaults.pattern,
                        help="score folders only: unstructured, or N:M such as 2:4 (overrides --sparsity and --scope)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = MaskOptions(sparsity=args.sparsity, scope=args.scope, blocks=args.blocks, pattern=args.pattern)
    options.check()
    out = cli.resolve_out(args.out)
    sources = open_sources(args.sources, options)
    check_output(out, args.overwrite, sources)
    counts = count_masks(sources, progress=lambda done, total: print(f"layer {done}/{total}", file=sys.stderr,
                                                                      flush=True))
    print(write_outputs(out, counts, sources, options))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)

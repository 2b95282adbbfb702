#!/usr/bin/env python3
"""Paper-style result table from evaluation JSONs laid out as RESULTS/<row label>/<task>.json
(the layout scripts/legal.sh, scripts/medical.sh and scripts/reproduce_tables.sh write).

Every cell shows the value, its 95 % bootstrap interval, its percentage of the dense model's value (or
of the --percent-of row's), and `*` where the paired bootstrap against --reference (SparseGPT) excludes 0.
Rows named <label>~seed<N> are summarised in a second table as mean ± s.d. over seeds, with the same
--percent-of base and, per seed, the paired test against --reference's row of the same seed.

Example: python code/make_tables.py outputs/legal/eval --domain legal --md outputs/legal/table.md
"""

from __future__ import annotations

from dpruner import cli
from dpruner.guard import Output, protect
from dpruner.io import atomic_path
from dpruner.tables import (COLUMNS, DEFAULT_REFERENCE, DENSE, build_table, load_results, seed_table, to_csv,
                            to_markdown, validation_columns)
from dpruner.validate import check_results


def main(argv=None) -> int:
    parser = cli.make_parser(__doc__, prog="make_tables.py")
    parser.add_argument("results", help="folder holding <row label>/<task>.json result files")
    parser.add_argument("--domain", required=True,
                        help=f"which columns to show: {', '.join(sorted(COLUMNS))} (the paper's), or a domain YAML "
                             "path (one set of columns per task of its spec)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated row labels in display order (default: dense first, then all)")
    parser.add_argument("--reference", default=DEFAULT_REFERENCE,
                        help="row label every other row is paired against (ignored when it is not a row)")
    parser.add_argument("--percent-of", default=DENSE,
                        help="row label each value is shown as a percentage of (default: dense; e.g. the --reference "
                             "row, so the change against it is printed with its paired star)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="validation: the columns of `code/sweep.py --split validation` results (the domain's "
                             "validation text, WikiText-2 validation, held-out C4)")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    parser.add_argument("--csv", default=None, help="also write the table as CSV (one row per cell) here")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    folder = cli.resolve_out(args.results)
    protect([Output(f"--{kind}", cli.resolve_out(getattr(args, kind)), folder=False) for kind in ("md", "csv")],
            {"results folder": folder})
    results = load_results(folder)
    columns = validation_columns(args.domain) if args.split == "validation" else None
    check_results(folder, results, args.domain, columns)
    table = build_table(results, args.domain, labels, args.reference, columns=columns, percent_of=args.percent_of)
    seeds = seed_table(results, args.domain, args.reference, args.percent_of)
    markdown = to_markdown(table) + (f"\nMean ± s.d. over seeds:\n\n{seeds}" if seeds else "")
    for path, text in ((args.md, markdown), (args.csv, to_csv(table))):
        if path:
            with atomic_path(cli.resolve_out(path)) as tmp:
                tmp.write_text(text)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)

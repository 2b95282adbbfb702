#!/usr/bin/env python3
"""Paper-style result table from evaluation JSONs laid out as RESULTS/<row label>/<task>.json
(the layout scripts/legal.sh, scripts/medical.sh and scripts/reproduce_tables.sh write).

Every cell shows the value and, in parentheses, its percentage of the dense model's value.

Example: python code/make_tables.py outputs/legal/eval --domain legal --md outputs/legal/table.md
"""

from __future__ import annotations

from dpruner import cli
from dpruner.io import atomic_path
from dpruner.tables import COLUMNS, build_table, load_results, to_csv, to_markdown


def main(argv=None) -> int:
    parser = cli.make_parser(__doc__, prog="make_tables.py")
    parser.add_argument("results", help="folder holding <row label>/<task>.json result files")
    parser.add_argument("--domain", required=True,
                        help=f"which columns to show: {', '.join(sorted(COLUMNS))} (the paper's), or a domain YAML "
                             "path (one set of columns per task of its spec)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated row labels in display order (default: dense first, then all)")
    parser.add_argument("--md", default=None, help="also write the markdown table here")
    parser.add_argument("--csv", default=None, help="also write the table as CSV (one row per cell) here")
    args = parser.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    table = build_table(load_results(cli.resolve_out(args.results)), args.domain, labels)
    markdown = to_markdown(table)
    for path, text in ((args.md, markdown), (args.csv, to_csv(table))):
        if path:
            with atomic_path(cli.resolve_out(path)) as tmp:
                tmp.write_text(text)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    cli.run(main)

"""A store of finished table rows that outlives the run which made them.

A `--standard` table takes more CPU hours than one working session has, so its rows are kept in a
folder that is committed (results/<domain>-standard) and a later run, on another day or machine,
skips them. Two rules make such a table trustworthy:
- a row enters the store only whole (every task of one build of its model), by one rename;
- no dataset text enters it: generation rows keep their per-example ROUGE scores (all the tables'
  bootstrap needs) but not the reference or the generated text.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from dpruner import cli
from dpruner.errors import DPrunerError
from dpruner.data.files import read_jsonl
from dpruner.io import atomic_dir, read_json, write_json, write_jsonl
from dpruner.paths import REPO_ROOT

TEXT_KEYS = ("reference", "prediction")  # free text in generation examples (runner._run_generation)
ROWS_FILE = "rows.tsv"
CHECKOUT = f"{REPO_ROOT}/"


def _stored_example(row: dict[str, Any]) -> dict[str, Any]:
    """Generation examples (the ones with a reference) lose their texts; choice labels are kept. An id
    that names a file of this checkout ("/abs/repo/legal_pruning_data/...:1") loses the checkout's
    path, so rows made in two checkouts pair on the same ids."""
    if "reference" in row:
        row = {key: value for key, value in row.items() if key not in TEXT_KEYS}
    example_id = row.get("id")
    if isinstance(example_id, str) and example_id.startswith(CHECKOUT):
        row = {**row, "id": example_id[len(CHECKOUT):]}
    return row


def _copy_row(staging: Path, target: Path, names: Sequence[str]) -> list[dict[str, Any]]:
    """The row's results (and their examples, as stored) into `target`; returns the results."""
    results = []
    for name in names:
        result = read_json(staging / f"{name}.json")
        examples = staging / f"{name}.examples.jsonl"
        if examples.is_file():
            write_jsonl(target / examples.name, [_stored_example(row) for row in read_jsonl(examples)])
            result["examples_file"] = examples.name
        write_json(target / f"{name}.json", result)
        results.append(result)
    return results


def _cpu_model() -> str:
    """The CPU's model name (rows from two machines of one kind can differ: docs/RESULTS.md section 10)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def publish_row(staging: Path, store: Path, label: str, names: Sequence[str], commit: str = "unknown") -> Path:
    """Copy row `label` (the results `names` in `staging`) into `store/label` at once, and log where it
    was made in store/rows.tsv. Refuses an incomplete row and a row the store already has."""
    missing = [name for name in names if not (staging / f"{name}.json").is_file()]
    if missing:
        raise DPrunerError(f"row {label} in {staging} lacks {', '.join(missing)}; it is not published")
    target = store / label
    if target.exists():
        raise DPrunerError(f"{target} already exists; a finished row is never replaced")
    with atomic_dir(target) as partial:  # a hidden folder beside target until it is whole
        results = _copy_row(staging, partial, names)
    first = results[0]
    seconds = sum(float(result.get("seconds", {}).get("total", 0.0)) for result in results)
    threads = first.get("settings", {}).get("torch_threads", "?")
    capability = first.get("versions", {}).get("cpu_capability", "?")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(store / ROWS_FILE, "a", encoding="utf-8") as log:
        log.write(f"{label}\t{when}\t{commit}\t{_cpu_model()} ({capability})\t{threads} threads\t{seconds:.0f} s\n")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.make_parser("Copy one finished row into a store of rows (docs/RESULTS.md section 11).",
                             prog="python -m dpruner.evaluation.store")
    parser.add_argument("staging", type=Path, help="the row's folder of <task>.json results")
    parser.add_argument("store", type=Path, help="the store (e.g. results/legal-standard)")
    parser.add_argument("label", help="the row's label")
    parser.add_argument("names", nargs="+", help="the result names that make the row whole")
    parser.add_argument("--commit", default="unknown", help="the code's git commit, for rows.tsv")
    args = parser.parse_args(argv)
    target = publish_row(args.staging, args.store, args.label, args.names, args.commit)
    print(f"[row] {args.label} -> {target}")
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Range checks shared by every CLI and the stage-2 YAML, and a YAML reader that refuses duplicate keys.

`nan < low` is false, so a plain comparison lets NaN through every range; here a value must first be
finite. Every numeric command-line option is checked by its destination name in `OPTION_RANGES`
(the parser runs it after parsing, so one table covers all CLIs).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpruner.errors import DPrunerError


@dataclass(frozen=True)
class Range:
    """low <= value (< high when `open_high`, else <= high); None = unbounded."""

    low: float | None = None
    high: float | None = None
    open_high: bool = False

    def describe(self) -> str:
        if self.high is None:
            return f">= {self.low:g}"
        if self.low is None:
            return f"<= {self.high:g}"
        return f"in [{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return False
        return True


AT_LEAST_1 = Range(1)
# Command-line options by argparse destination. A float option not listed here still has to be finite.
OPTION_RANGES: dict[str, Range] = {
    "sparsity": Range(0, 1, open_high=True),
    "blocksize": AT_LEAST_1,
    "percdamp": Range(0, 1),
    "alpha": Range(0, 1),
    "batch_size": AT_LEAST_1,
    "nsamples": AT_LEAST_1,
    "seqlen": Range(2),
    "seed": Range(0),
    "blocks": AT_LEAST_1,
    "limit": AT_LEAST_1,
    "max_length": AT_LEAST_1,
    "stride": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1,
    "ppl_limit": AT_LEAST_1,
    "ppl_max_length": Range(2),
    "ppl_stride": AT_LEAST_1,
    "choice_limit": AT_LEAST_1,
    "wiki_limit": AT_LEAST_1,
    "wiki_seqlen": Range(2),
}


def check_value(name: str, value: Any, allowed: Range | None) -> None:
    """One number against its range; NaN and inf never pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise DPrunerError(f"{name}={value} is not a finite number")
    if allowed is not None and not allowed.holds(value):
        raise DPrunerError(f"{name} must be {allowed.describe()}, got {value}")


def check_namespace(args: argparse.Namespace) -> None:
    """Every parsed numeric option (lists included) against `OPTION_RANGES`."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            check_value(f"--{dest.replace('_', '-')}", item, OPTION_RANGES.get(dest))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error instead of the last value winning."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DPrunerError(f"{loader.name}:{line}: duplicate key {key!r} (first given on line {seen[key]})")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_text_utf8(path: Path) -> str:
    """A text file as UTF-8; bad bytes are reported as `file:line`."""
    return decode_utf8(path.read_bytes(), path)


def decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` (the contents of `path` from line `first_line` on) as text, or a `file:line` error."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + first_line
        raise DPrunerError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
                           "save the file as UTF-8") from None


def load_yaml(path: Path) -> Any:
    """A YAML file (UTF-8, no duplicate keys) with `file:line` errors."""
    text = read_text_utf8(path)
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DPrunerError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    finally:
        loader.dispose()


def check_results(folder: Path, results: dict[str, dict[str, Any]], domain: str,
                  columns: Sequence[Any] | None = None) -> None:
    """Every result file make_tables reads is an evaluation result holding a number for each of its
    columns (default: the shipped domain's), so a wrong file is named instead of failing inside the table code."""
    from dpruner.tables import COLUMNS

    columns = COLUMNS.get(domain, []) if columns is None else columns
    for label, tasks in results.items():
        for task, result in tasks.items():
            path = folder / label / f"{task}.json"
            if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
                raise DPrunerError(f"{path}: expected an evaluation result (a JSON object with a 'metrics' object)")
            if not isinstance(result.get("sparsity", {}), dict):
                raise DPrunerError(f"{path}: 'sparsity' must be an object")
            for column in (c for c in columns if c.task == task):
                try:
                    value = column.get(result)
                except (KeyError, TypeError, IndexError, StopIteration, AttributeError):
                    raise DPrunerError(f"{path}: its metrics hold no value for {column.title!r} "
                                       f"(is it a {task} result?)") from None
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise DPrunerError(f"{path}: {column.title!r} is {value!r}; expected a number")

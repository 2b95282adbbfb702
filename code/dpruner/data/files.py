"""Locate prepared data files by their manifest name and read JSON/JSONL with precise errors."""

from __future__ import annotations

import ast
import gzip
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from dpruner.errors import DPrunerError
from dpruner.io import sha256_file
from dpruner.paths import REPO_ROOT, data_dir
from dpruner.validate import decode_utf8

DATA_MANIFEST = REPO_ROOT / "legal_pruning_data" / "manifest.json"


@lru_cache(maxsize=1)
def manifest_entries() -> dict[str, dict[str, Any]]:
    entries = json.loads(DATA_MANIFEST.read_text())["files"]
    return {entry["name"]: entry for entry in entries}


def data_file(name: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a manifest file (e.g. `casehold_test`) under the data root, which must hold it."""
    entries = manifest_entries()
    if name not in entries:
        raise DPrunerError(f"unknown data file {name!r}; known: {', '.join(sorted(entries))}")
    base = data_dir(root)
    path = base / entries[name]["path"]
    if not path.is_file():
        raise DPrunerError(
            f"data file {path} is missing; run `python legal_pruning_data/prepare.py` or pass --data-dir")
    return path


def describe(path: Path) -> dict[str, Any]:
    """What a result file records about the data it used."""
    return {"path": str(path), "sha256": sha256_file(path)}


def open_bytes(path: Path):
    """Data files are read as bytes and decoded line by line, so bad UTF-8 is reported as file:line."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_jsonl_numbered(path: str | os.PathLike, required: Iterable[str] = (),
                        limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSON Lines file, each with its `file:line`, so later field checks can name the line.
    A malformed row is reported with its file and line number."""
    path = Path(path)
    required = tuple(required)
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        handle = open_bytes(path)
    except FileNotFoundError:
        raise DPrunerError(f"{path}: file not found") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DPrunerError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DPrunerError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise DPrunerError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            rows.append((f"{path}:{lineno}", row))
    if not rows:
        raise DPrunerError(f"{path}: no rows")
    return rows


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = (), limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (see `read_jsonl_numbered`)."""
    return [row for _, row in read_jsonl_numbered(path, required, limit)]


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open_bytes(path) as handle:
            return json.loads(decode_utf8(handle.read(), path))
    except FileNotFoundError:
        raise DPrunerError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DPrunerError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def as_list(value: Any, where: str) -> list[str]:
    """A list field that some copies store as its Python repr (e.g. PubMedQA CONTEXTS in JSONL)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DPrunerError(f"{where}: cannot parse the list {value[:40]!r}...") from None
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    raise DPrunerError(f"{where}: expected a list, got {type(value).__name__}")

"""Where the project keeps things: repository root, prepared data, caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# `legal_pruning_data/prepare.py` lays the verified data files out here (never committed).
PREPARED_DATA_DIR = REPO_ROOT / "legal_pruning_data" / "data"
# Where the offline copies live on this machine; prepare.py reads from here by default.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data root: an explicit override, then $DPRUNER_DATA_DIR, then the prepared folder."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get("DPRUNER_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return PREPARED_DATA_DIR


def cache_dir() -> Path:
    """Converted models and other derived artefacts ($DPRUNER_CACHE, default ~/.cache/dpruner)."""
    env = os.environ.get("DPRUNER_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "dpruner"
    root.mkdir(parents=True, exist_ok=True)
    return root


def user_path(path: str | os.PathLike) -> Path:
    """A path given on the command line: relative to the caller's working directory."""
    return Path(path).expanduser().resolve()

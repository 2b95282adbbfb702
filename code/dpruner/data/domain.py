"""Stage-2 training strings and domain calibration text, rendered from a domain spec (data/spec.py).

The shipped specs (config/domains/legal.yaml, medical.yaml) keep the original train_lomo.py's
sources, counts and templates with its quirks ("Hold statement 0", the missing closing quote after
holding 3, "which indicates" without "that" for PubMedQA PQA-A), because the importance scores depend
on the exact text the model was trained on; tests/test_domains.py compares them byte for byte.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dpruner.data.spec import DomainSpec, TrainingSource, load_domain
from dpruner.errors import DPrunerError


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def source_texts(source: TrainingSource, data_dir: str | os.PathLike | None, count: int | None,
                 file: str | None = None, quiet: bool = False) -> list[str]:
    """One source's strings: its first `count` rows (None = all) rendered by its template."""
    if count == 0:
        return []
    if source.source.file_key and not file:
        if not quiet:
            _warn(f"{source.source.file_key} not set: {source.source.missing or source.name}; skipped")
        return []
    rows = source.source.rows(data_dir, source.template.row_fields(), count, override=file)
    if count is not None and count > len(rows) and not quiet:
        _warn(f"{source.name}: {count} examples requested, only {len(rows)} available; using all")
    return [source.template.render(row, where) for where, row in rows]


def training_texts(spec: DomainSpec, data_dir: str | os.PathLike | None = None,
                   settings: Mapping[str, Any] | None = None, seed: int | None = None,
                   sources: Sequence[TrainingSource] | None = None, quiet: bool = False) -> list[str]:
    """The strings of `spec`'s training sources in order, then shuffled with `seed` (default: the spec's).

    `settings` maps a source's `count_key` / `file_key` (stage-2 config keys such as `casehold_examples`,
    `mednli_file`) to its value; a source without one uses the spec's count. This is what stage 2 trains
    on and, by default, the domain calibration text.
    """
    settings = settings or {}
    texts: list[str] = []
    for source in spec.training if sources is None else sources:
        count = settings.get(source.count_key, source.source.count) if source.count_key else source.source.count
        file = settings.get(source.source.file_key) if source.source.file_key else None
        texts += source_texts(source, data_dir, count, file, quiet)
    if not texts:
        raise DPrunerError(f"domain {spec.name} ({spec.path}): the configured sources give no training examples")
    if spec.shuffle:
        random.Random(spec.seed if seed is None else seed).shuffle(texts)
    return texts


def calibration_texts(spec: DomainSpec, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Domain calibration text: the spec's `calibration` sources, else its training strings at the
    spec's counts and seed. Sources that need a user-supplied file (PQA-A, MedNLI) are left out."""
    return training_texts(spec, data_dir, sources=spec.calibration, quiet=True)


def domain_texts(config) -> list[str]:
    """Stage 2's strings for a TrainConfig: its domain's spec, counts and files from the config, its seed."""
    spec = load_domain(config.domain)
    settings = {key: getattr(config, key) for source in spec.training
                for key in (source.count_key, source.source.file_key) if key and hasattr(config, key)}
    return training_texts(spec, config.data_dir, settings, seed=config.seed)

"""Data preparation (checksums, local and URL sources), JSONL errors, templates, calibration windows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dpruner.config import TrainConfig
from dpruner.data.calibration import sample_windows
from dpruner.data.domain import domain_texts, source_texts
from dpruner.data.files import data_file, manifest_entries, read_jsonl
from dpruner.data.spec import load_domain
from dpruner.errors import DPrunerError
from dpruner.paths import SHARED_DATA_DIR

PREPARE = REPO / "legal_pruning_data" / "prepare.py"
sys.path.insert(0, str(PREPARE.parent))
import prepare  # noqa: E402


def small_manifest(tmp: Path, source: Path, url_base: str | None = None) -> Path:
    """A manifest with the two smallest general files, optionally pointing at file:// URLs."""
    entries = [e for e in json.loads(prepare.MANIFEST.read_text())["files"] if e["path"].startswith("general/c4_olmo")][:2]
    if url_base:
        entries = [dict(e, url=f"{url_base}/{e['path']}") for e in entries]
    path = tmp / "manifest.json"
    path.write_text(json.dumps({"files": entries}))
    return path


def test_prepare_from_local_folder_verifies_and_skips(tmp_path):
    manifest = small_manifest(tmp_path, SHARED_DATA_DIR)
    logs: list[str] = []
    placed = prepare.prepare(tmp_path / "out", SHARED_DATA_DIR, manifest=manifest, log=logs.append)
    assert len(placed) == 2 and all(p.is_file() for p in placed)
    assert all(line.startswith("prepared") for line in logs)
    logs.clear()
    prepare.prepare(tmp_path / "out", SHARED_DATA_DIR, manifest=manifest, log=logs.append)
    assert all(line.startswith("ok") for line in logs)


def test_prepare_online_path_downloads_by_url(tmp_path):
    manifest = small_manifest(tmp_path, SHARED_DATA_DIR, url_base=SHARED_DATA_DIR.as_uri())
    placed = prepare.prepare(tmp_path / "out", None, manifest=manifest, log=lambda _: None)
    assert [p.read_bytes() for p in placed] == [(SHARED_DATA_DIR / p.relative_to(tmp_path / "out")).read_bytes()
                                               for p in placed]


def test_corrupt_or_missing_source_is_one_line_and_writes_nothing(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(SHARED_DATA_DIR / "general", source / "general")
    first = sorted((source / "general" / "c4_olmo_fixtures").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-10])
    result = subprocess.run([sys.executable, str(PREPARE), "--from", str(source), "--out", str(tmp_path / "out"),
                             "--only", "general"], capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "does not match the manifest" in line
    assert not list((tmp_path / "out").rglob("c4-sample.01.json.gz"))
    missing = subprocess.run([sys.executable, str(PREPARE), "--from", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "out2")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found in" in missing.stderr


def test_manifest_names_resolve_to_prepared_files():
    for name, entry in manifest_entries().items():
        assert data_file(name).stat().st_size == entry["bytes"]


def test_malformed_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n')
    with pytest.raises(DPrunerError, match=r"rows.jsonl:3: malformed JSON"):
        read_jsonl(path)
    path.write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(DPrunerError, match=r"rows.jsonl:2: missing key\(s\) text"):
        read_jsonl(path, required=("text",))


def test_casehold_template_keeps_the_original_quirks():
    (text,) = source_texts(load_domain("legal").training[0], None, 1)
    row = read_jsonl(data_file("casehold_train"), limit=1)[0]
    assert text.startswith(f"A citing text consisting of the context and legal citation text is '{row['citing_prompt']}'. "
                           "Hold statement 0 is '")
    assert f"holding statement 3 is '{row['holding_3']}, and holding statement 4" in text  # missing quote kept
    ordinal = ("first", "second", "third", "fourth", "fifth")[int(row["label"])]
    assert text.endswith(f"The correct answer is holding statement {row['label']}, which is the {ordinal} statement.")


def test_domain_mix_counts_and_seeded_shuffle():
    config = TrainConfig(casehold_examples=5, billsum_examples=3)
    texts = domain_texts(config)
    assert len(texts) == 8 and sum(t.startswith("A bill text is") for t in texts) == 3
    assert texts == domain_texts(config) and texts != domain_texts(TrainConfig(casehold_examples=5, billsum_examples=3, seed=1))
    medical = domain_texts(TrainConfig(domain="medical", pubmedqa_examples=4, hqs_examples=2))
    assert sum("which indicates that" in t for t in medical) == 4


class CharTokenizer:
    """One token per character: window positions are easy to reason about."""

    def __call__(self, text: str):
        class Encoded:
            input_ids = [ord(c) for c in text]
        return Encoded()


def test_calibration_windows_are_deterministic_and_respect_the_document_rule():
    texts = ["a" * 5, "b" * 50, "c" * 8]
    windows = sample_windows(CharTokenizer(), texts, nsamples=6, seqlen=10, seed=0)
    assert windows.shape == (6, 10) and torch.all(windows == ord("b"))  # only the document longer than seqlen
    assert torch.equal(windows, sample_windows(CharTokenizer(), texts, 6, 10, seed=0))
    stream = sample_windows(CharTokenizer(), texts, nsamples=20, seqlen=10, seed=0, windowing="concat")
    assert {chr(int(t)) for t in stream.unique()} >= {"a", "c"}
    with pytest.raises(DPrunerError, match="--windowing concat"):
        sample_windows(CharTokenizer(), texts, 2, seqlen=60)

"""dpruner.evaluation.store: a row enters the store whole and without dataset text, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpruner.errors import DPrunerError
from dpruner.evaluation.store import ROWS_FILE, publish_row
from dpruner.paths import REPO_ROOT
from dpruner.tables import load_results


def staged_row(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "billsum.json").write_text(json.dumps({"metrics": {"rouge1": 0.3}, "examples_file": "/tmp/x",
                                                     "seconds": {"total": 2.0},
                                                     "settings": {"torch_threads": 2},
                                                     "versions": {"cpu_capability": "AVX512"}}))
    (folder / "billsum.examples.jsonl").write_text(
        json.dumps({"id": f"{REPO_ROOT}/data/billsum_test.txt:1", "prediction": "generated text",
                    "reference": "the bill's summary", "rouge1": 0.3})
        + "\n")
    (folder / "casehold.json").write_text(json.dumps({"metrics": {"accuracy": 0.5}, "seconds": {"total": 3.0}}))
    (folder / "casehold.examples.jsonl").write_text(
        json.dumps({"id": "c1", "label": "2", "prediction": "2", "scores": [0.1, 0.2]}) + "\n")
    return folder


def test_publish_row_drops_generation_text_and_keeps_scores(tmp_path):
    staging = staged_row(tmp_path / "out" / "eval" / "sparsegpt")
    store = tmp_path / "store"
    store.mkdir()
    target = publish_row(staging, store, "sparsegpt", ["billsum", "casehold"], commit="abc123")
    generation = json.loads((target / "billsum.examples.jsonl").read_text())
    assert generation == {"id": "data/billsum_test.txt:1", "rouge1": 0.3}  # no checkout path
    choice = json.loads((target / "casehold.examples.jsonl").read_text())
    assert choice == {"id": "c1", "label": "2", "prediction": "2", "scores": [0.1, 0.2]}
    assert json.loads((target / "billsum.json").read_text())["examples_file"] == "billsum.examples.jsonl"
    log = (store / ROWS_FILE).read_text().split("\t")
    assert log[0] == "sparsegpt" and log[2] == "abc123" and "(AVX512)" in log[3] and log[-1] == "5 s\n"
    assert set(load_results(store)) == {"sparsegpt"}


def test_publish_row_refuses_an_incomplete_row_and_a_second_copy(tmp_path):
    staging = staged_row(tmp_path / "row")
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(DPrunerError, match="lacks wikitext"):
        publish_row(staging, store, "sparsegpt", ["billsum", "casehold", "wikitext"])
    assert not list(store.iterdir())
    publish_row(staging, store, "sparsegpt", ["billsum", "casehold"])
    with pytest.raises(DPrunerError, match="never replaced"):
        publish_row(staging, store, "sparsegpt", ["billsum", "casehold"])


def test_load_results_ignores_a_row_still_being_copied(tmp_path):
    staged_row(tmp_path / "store" / "dense")
    staged_row(tmp_path / "store" / ".sparsegpt.partial")
    assert set(load_results(tmp_path / "store")) == {"dense"}

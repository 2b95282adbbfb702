"""The Python API: docs/API.md's examples run as written (on the embedded model, tiny settings), and
DPruner's importance scores and masks equal those of the CLIs run as separate processes with the same
settings."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from dpruner.io import load_score_layers
from dpruner.models import PROJECTIONS

API_DOC = REPO / "docs" / "API.md"
SETTINGS = ["--nsamples", "2", "--seqlen", "64"]
TRAIN = ["max_steps=2", "casehold_examples=8", "billsum_examples=0", "data_max_length=64",
         "per_device_train_batch_size=2"]


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.fixture(scope="module")
def doc_run(tmp_path_factory, embedded_model):
    """Every python block of docs/API.md, in order, in one namespace, from a scratch folder."""
    folder = tmp_path_factory.mktemp("api-doc")
    (folder / "examples").symlink_to(REPO / "examples")
    namespace: dict = {}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for block in code_blocks(API_DOC.read_text()):
            exec(compile(block, str(API_DOC), "exec"), namespace)
    finally:
        os.chdir(before)
    return folder, namespace


def test_doc_has_examples_for_every_entry_point():
    text = "\n".join(code_blocks(API_DOC.read_text()))
    for call in ("DPruner(", ".general_importance(", ".dual_importance(", ".prune(", ".evaluate(", ".save(",
                 "dpruner.prune("):
        assert call in text


@pytest.mark.slow
def test_api_doc_examples_run(doc_run):
    folder, ns = doc_run
    assert (Path(ns["pruned"]) / "pruning_report.json").is_file()
    assert (Path(ns["saved"]) / "pruning_report.json").is_file() and ns["saved"].parent == folder / "outputs/api-example"
    ppl = ns["results"]["legal_perplexity"]["metrics"]["multilegalpile"]["ppl_window_mean"]
    assert math.isfinite(ppl) and ppl > 1
    assert ns["choice"]["casehold"]["metrics"]["examples"] == 2
    assert ns["code"]["python-code_perplexity"]["versions"]["python"]
    for baseline in (ns["wanda"], ns["magnitude"]):
        assert (Path(baseline) / "pruning_report.json").is_file()


def masks(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    return {k: v == 0 for k, v in weights.items() if any(p in k for p in PROJECTIONS)}


def assert_same_scores(a: Path, b: Path) -> None:
    left, right = load_score_layers(a), load_score_layers(b)
    assert len(left) == len(right) > 0
    for layer_a, layer_b in zip(left, right):
        assert layer_a.keys() == layer_b.keys()
        assert all(torch.equal(layer_a[k], layer_b[k]) for k in layer_a)


@pytest.mark.slow
def test_dpruner_api_equals_the_clis(doc_run, tmp_path):
    folder, ns = doc_run
    pruner = ns["pruner"]
    general = tmp_path / "general"
    assert run_cli("general.py", "smollm2-135m", "c4", *SETTINGS, "--out", general).returncode == 0
    assert_same_scores(pruner.general, general)
    lomo = tmp_path / "lomo"
    assert run_cli("src/train_lomo.py", REPO / "config/args_lomo.yaml", "model_name_or_path=smollm2-135m",
                   "domain=legal", "deepspeed=null", f"general_importance_dir={general}", f"output_dir={lomo}",
                   *TRAIN).returncode == 0
    assert_same_scores(pruner.dual, lomo / "importance")
    pruned = tmp_path / "pruned"
    assert run_cli("save_model.py", "smollm2-135m", lomo / "importance", pruned, "--sparsity", "0.5").returncode == 0
    api_masks, cli_masks = masks(Path(pruner.pruned)), masks(pruned)
    assert api_masks and api_masks.keys() == cli_masks.keys() and len(api_masks) % len(PROJECTIONS) == 0
    assert all(torch.equal(api_masks[k], cli_masks[k]) for k in api_masks)

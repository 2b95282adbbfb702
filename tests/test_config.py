"""Stage-2 YAML config: typing, validation messages, overrides, path resolution; result tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO
from dpruner.config import load_config
from dpruner.errors import DPrunerError
from dpruner.tables import build_table, load_results, to_csv, to_markdown


@pytest.fixture
def general_dir(tmp_path) -> Path:
    folder = tmp_path / "general"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("name", ["args_lomo.yaml", "args_lomo_medical.yaml", "args_lomo_upstream.yaml"])
def test_shipped_configs_load(name, general_dir):
    config = load_config(REPO / "config" / name, [f"general_importance_dir={general_dir}"])
    assert Path(config.deepspeed).is_file() and Path(config.output_dir).is_absolute()


def test_overrides_are_typed_and_paths_do_not_depend_on_cwd(general_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "config" / "args_lomo.yaml",
                         [f"general_importance_dir={general_dir}", "max_steps=3", "learning_rate=1e-3",
                          "clip_grad_norm=null", "deepspeed=config/ds_config_cpu.json"])
    assert config.max_steps == 3 and config.learning_rate == 0.001 and config.clip_grad_norm is None
    assert config.deepspeed == str(REPO / "config" / "ds_config_cpu.json")
    assert config.output_dir == str(REPO / "outputs" / "lomo_legal")


@pytest.mark.parametrize("overrides, expected", [
    ([], 100.0),  # anchor, chosen on validation text
    (["regularizer=upstream"], 0.1),  # the original's constant, as the upstream form reproduces it
    (["regularizer=squared_grad"], 0.1),
    (["regularizer_lambda=3"], 3.0),  # an explicit lambda is never replaced
    (["regularizer=upstream", "regularizer_lambda=0"], 0.0),
])
def test_null_lambda_resolves_to_the_form_default(overrides, expected, general_dir):
    config = load_config(REPO / "config" / "args_lomo.yaml", [f"general_importance_dir={general_dir}", *overrides])
    assert config.regularizer_lambda == expected


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 0.1\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("per_device_train_batch_size: eight\n", "per_device_train_batch_size='eight' must be an integer"),
    ("warmup: 1.5\n", "warmup=1.5 out of range; expected [0, 1)"),
    ("domain: finance\n", "domain='finance'; expected one of legal, medical"),
    ("gradient_checkpointing: 3\n", "gradient_checkpointing=3 must be true or false"),
    ("clip_grad_norm: null\nimportance_accumulate: upstream\n", "importance_accumulate=upstream needs clip_grad_norm"),
    ("learning_rate: [0.1\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_values_name_the_key(text, message, tmp_path, general_dir):
    with pytest.raises(DPrunerError) as info:
        load_config(write(tmp_path, text), [f"general_importance_dir={general_dir}"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_original_keys_without_effect_warn_but_load(tmp_path, general_dir, capsys):
    config = load_config(write(tmp_path, "llama_type: '7b'\ndata_tag: x\nlearning_rate: 0.03\n"),
                         [f"general_importance_dir={general_dir}"])
    assert config.learning_rate == 0.03
    assert "'llama_type' has no effect" in capsys.readouterr().err


def test_missing_stage1_scores_are_reported(tmp_path):
    with pytest.raises(DPrunerError, match="general_importance_dir .* does not exist"):
        load_config(write(tmp_path, f"general_importance_dir: {tmp_path / 'none'}\n"))


def result(task: str, metrics: dict, projection: float) -> dict:
    return {"task": task, "metrics": metrics,
            "sparsity": {"projection_sparsity": projection, "overall_sparsity": projection * 0.8}}


def test_table_shows_values_and_percent_of_dense(tmp_path):
    rows = {"dense": (10.0, 0.40, 0.0), "wanda": (12.5, 0.30, 0.5)}
    for label, (ppl, acc, sparsity) in rows.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "legal_perplexity.json").write_text(json.dumps(result(
            "legal_perplexity", {"multilegalpile": {"ppl_window_mean": ppl, "ppl_token_weighted": ppl + 1}}, sparsity)))
        (folder / "casehold.json").write_text(json.dumps(result("casehold", {"accuracy": acc, "macro_f1": acc / 2}, sparsity)))
    table = build_table(load_results(tmp_path), "legal", ["dense", "wanda"])
    markdown = to_markdown(table)
    assert "| Wanda | 50.0 / 40.0 | 12.500 (125.0%) | 13.500 (122.7%) | 30.00 (75.0%) | 15.00 (75.0%) |" in markdown
    assert "95 % bootstrap interval" in markdown  # the legend; these results have no per-unit rows
    assert markdown.splitlines()[2].startswith("| Dense | 0.0 / 0.0 | 10.000 |")
    assert "BillSum" not in markdown  # columns without any result are left out
    assert "wanda,Wanda,0.5,0.4,CaseHOLD acc,0.3,75.0,dense,,,,,,," in to_csv(table)
    with pytest.raises(DPrunerError, match="no results for row"):
        build_table(load_results(tmp_path), "legal", ["dense", "magnitude"])
    against_wanda = build_table(load_results(tmp_path), "legal", ["dense", "wanda"], percent_of="wanda")
    assert "| Dense | 0.0 / 0.0 | 10.000 (80.0%) | 11.000 (81.5%) | 40.00 (133.3%) | 20.00 (133.3%) |" \
        in to_markdown(against_wanda)
    assert "percentage of Wanda's" in to_markdown(against_wanda)
    assert "dense,Dense,0.0,0.0,CaseHOLD acc,0.4,133.33333333333334,wanda,,,,,,," in to_csv(against_wanda)

"""The eight evaluation CLIs: result files on a tiny model, one-line errors for bad inputs, and slow
integration runs on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CODE, error_line, run_cli, save_tiny_llama
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME

RESULT_KEYS = {"task", "models", "sparsity", "data", "settings", "versions", "command", "metrics", "seconds"}


def cli_main(script: str):
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", CODE / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_in_process(script: str, *args: str) -> int:
    return cli_main(script)([str(a) for a in args])


@pytest.fixture(scope="module")
def mednli_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mednli") / "mli_test.jsonl"
    rows = [("The patient has a fever.", "The patient is febrile.", "entailment"),
            ("No chest pain.", "The patient has chest pain.", "contradiction"),
            ("He takes aspirin.", "He has a headache.", "neutral")]
    path.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "gold_label": c}) + "\n" for a, b, c in rows))
    return path


CLI_CASES = {
    "legal_perplexity_evaluation.py": ["--limit", "3", "--max-length", "64", "--stride", "32"],
    "medical_perplexity_evaluation.py": ["--limit", "3", "--max-length", "64", "--stride", "32"],
    "general_perplexity_evaluation.py": ["--limit", "10", "--max-length", "64"],
    "test_casehold.py": ["--limit", "2", "--batch-size", "3"],
    "test_pubmedqa.py": ["--limit", "2"],
    "test_mednli.py": [],
    "test_billsum.py": ["--limit", "2", "--max-new-tokens", "4", "--greedy"],
    "test_hqs.py": ["--limit", "2", "--max-new-tokens", "4"],
    "domain_evaluation.py": ["--domain", str(CODE.parent / "examples/domains/python-code.yaml"), "--task",
                             "function_body", "--limit", "2"],
}


@pytest.mark.parametrize("script", sorted(CLI_CASES))
def test_every_cli_writes_a_complete_result(script, tiny_llama_dir, mednli_file, tmp_path, capsys):
    out = tmp_path / "result.json"
    extra = [mednli_file] if script == "test_mednli.py" else []
    assert run_in_process(script, tiny_llama_dir, tiny_llama_dir, *extra, *CLI_CASES[script], "--out", out) == 0
    result = json.loads(out.read_text())
    assert RESULT_KEYS <= result.keys()
    assert result["models"]["dense"] is True and result["sparsity"]["source"] == "counted"
    assert {"transformers", "torch", "dpruner"} <= result["versions"].keys()
    assert all(len(source.get("sha256", "")) == 64 for source in result["data"])
    assert result["seconds"]["total"] >= result["seconds"]["evaluate"] > 0
    metrics = result["metrics"]
    if "perplexity" in script:
        for corpus in metrics.values():
            assert corpus["ppl_window_mean"] > 1 and corpus["ppl_token_weighted"] > 1 and corpus["windows"] >= 1
        assert result["settings"]["max_length"] == 64
        if script.startswith("general"):  # both texts; non-overlapping full windows, so both averages agree
            assert set(metrics) == {"wikitext2", "c4"}
            for corpus in metrics.values():
                assert corpus["scored_tokens"] == corpus["windows"] * 63
                assert corpus["ppl_window_mean"] == pytest.approx(corpus["ppl_token_weighted"])
    else:
        rows = [json.loads(line) for line in Path(result["examples_file"]).read_text().splitlines()]
        assert len(rows) == metrics["examples"]
        if "rouge1" in metrics:
            assert {"prediction", "reference", "rouge1", "rougeL"} <= rows[0].keys()
            assert result["settings"]["decoding"]["max_new_tokens"] == 4
        else:
            assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macro_f1"] <= 1
    assert f"-> {out}" in capsys.readouterr().out


def test_sparsity_comes_from_the_pruning_report(tiny_llama_dir, tmp_path):
    pruned = tmp_path / "pruned"
    shutil.copytree(tiny_llama_dir, pruned)
    (pruned / REPORT_NAME).write_text(json.dumps({"sparsity": {"projection_sparsity": 0.52, "overall_sparsity": 0.5,
                                                               "per_layer": [{"layer": 0}]}}))
    out = tmp_path / "r.json"
    run_in_process("test_pubmedqa.py", tiny_llama_dir, pruned, "--limit", "1", "--out", out)
    result = json.loads(out.read_text())
    assert result["sparsity"] == {"source": str(pruned / REPORT_NAME), "projection_sparsity": 0.52,
                                  "overall_sparsity": 0.5}
    assert result["models"]["dense"] is False


def test_bad_numbers_are_user_errors(tiny_llama_dir):
    with pytest.raises(DPrunerError, match="--limit must be >= 1"):
        run_in_process("test_casehold.py", tiny_llama_dir, tiny_llama_dir, "--limit", "0")


# --- bad inputs through the real command line: one `error:` line, non-zero exit ---------------------

def test_malformed_row_names_file_and_line_and_leaves_out_untouched(tiny_llama_dir, tmp_path):
    data = tmp_path / "data" / "legal"
    data.mkdir(parents=True)
    good = (CODE.parent / "legal_pruning_data/data/legal/casehold_test.txt").read_text().splitlines()[0]
    (data / "casehold_test.txt").write_text(good + "\n{not json\n")
    out = tmp_path / "out" / "result.json"
    out.parent.mkdir()
    out.write_text("old result\n")
    result = run_cli("test_casehold.py", tiny_llama_dir, tiny_llama_dir, "--data-dir", tmp_path / "data", "--out", out)
    line = error_line(result)
    assert "casehold_test.txt:2" in line and "malformed JSON" in line
    assert out.read_text() == "old result\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.json"]  # no temp or partial files


def test_architecture_mismatch_names_both_models(tiny_llama_dir, tmp_path):
    other = save_tiny_llama(tmp_path / "narrow", hidden_size=32, num_hidden_layers=2)
    line = error_line(run_cli("test_casehold.py", tiny_llama_dir, other, "--limit", "1"))
    assert str(other) in line and str(tiny_llama_dir) in line
    assert "hidden_size, num_hidden_layers differ" in line


def test_pickled_model_file_is_refused(tiny_llama_dir, tmp_path):
    pickled = tmp_path / "pruned_model.pt"
    torch.save({"not": "loaded"}, pickled)
    line = error_line(run_cli("legal_perplexity_evaluation.py", tiny_llama_dir, pickled))
    assert "pickled" in line and str(pickled) in line


def test_mednli_without_file_explains_where_to_get_it(tiny_llama_dir):
    line = error_line(run_cli("test_mednli.py", tiny_llama_dir, tiny_llama_dir))
    assert "PhysioNet" in line


# --- the embedded model, tiny settings -------------------------------------------------------------

def check_common(result: dict, task: str) -> None:
    assert RESULT_KEYS <= result.keys() and result["task"] == task
    assert result["models"]["dense"] is True
    assert 0 <= result["sparsity"]["overall_sparsity"] < 0.01  # dense (the GGUF dequantization has a few zeros)


@pytest.mark.slow
def test_legal_perplexity_on_embedded_model(embedded_model, tmp_path):
    out = tmp_path / "ppl.json"
    result = run_cli("legal_perplexity_evaluation.py", "smollm2-135m", "smollm2-135m", "--limit", "2",
                     "--max-length", "64", "--stride", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    check_common(data, "legal_perplexity")
    ppl = data["metrics"]["multilegalpile"]
    assert 1 < ppl["ppl_token_weighted"] < 200 and 1 < ppl["ppl_window_mean"] < 200  # a real LM on real text
    assert data["settings"]["stride"] == 32 and ppl["documents"] == 2


@pytest.mark.slow
def test_casehold_on_embedded_model(embedded_model, tmp_path):
    out = tmp_path / "casehold.json"
    result = run_cli("test_casehold.py", "smollm2-135m", "smollm2-135m", "--limit", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    check_common(data, "casehold")
    assert data["metrics"]["examples"] == 1 and data["metrics"]["context_prefix_mismatches"] == 0
    row = json.loads(Path(data["examples_file"]).read_text())
    assert len(row["scores"]) == 5 and all(score < 0 for score in row["scores"])


@pytest.mark.slow
def test_hqs_on_embedded_model(embedded_model, tmp_path):
    out = tmp_path / "hqs.json"
    result = run_cli("test_hqs.py", "smollm2-135m", "smollm2-135m", "--limit", "2", "--max-new-tokens", "6",
                     "--greedy", "--out", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    check_common(data, "hqs")
    rows = [json.loads(line) for line in Path(data["examples_file"]).read_text().splitlines()]
    assert len(rows) == 2 and all(row["prediction"].strip() for row in rows)
    assert data["settings"]["decoding"]["do_sample"] is False
    assert 0 <= data["metrics"]["rouge1"] <= 1

"""Bad inputs across every CLI: each must end in a non-zero exit with exactly one `error:` line naming the
offending file, key or value, no traceback, and every file that existed before unchanged (sha256).

The CLIs run in-process through `cli.run` (the same code path as the scripts, without starting Python
and torch once per case); an exception escaping `cli.run` would be a traceback and fails the case.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import error_line, save_tiny_llama
from dpruner.data.files import manifest_entries
from dpruner.paths import data_dir
from reliability import readonly_dir, run_inprocess, snapshot, write_scores

STAGE2 = "src/train_lomo.py"
CONFIG = "config/args_lomo.yaml"


@dataclass
class World:
    """Inputs shared by all cases (never to be changed by any of them)."""

    root: Path
    model: Path  # tiny Llama, 3 layers
    other: Path  # same shapes, other weights
    scores: Path  # dual importance of `model`
    other_scores: Path  # dual importance of `other`
    general: Path  # stage-1 scores of `model`
    results: Path  # make_tables input: results/dense/casehold.json


@pytest.fixture(scope="module")
def world(tmp_path_factory, embedded_model) -> World:
    root = tmp_path_factory.mktemp("world")
    model = save_tiny_llama(root / "model")
    other = save_tiny_llama(root / "other", seed=1)
    result = {"task": "casehold", "metrics": {"accuracy": 0.5, "macro_f1": 0.4}, "sparsity": {}}
    (root / "results" / "dense").mkdir(parents=True)
    (root / "results" / "dense" / "casehold.json").write_text(json.dumps(result))
    return World(root, model, other, write_scores(root / "scores", model), write_scores(root / "other_scores", other),
                 write_scores(root / "general", model, kind="general_importance", seed=1), root / "results")


def stage2(w: World, out: Path, **extra) -> list:
    values = dict(model_name_or_path=w.model, general_importance_dir=w.general, output_dir=out, max_steps=1,
                  per_device_train_batch_size=2, data_max_length=32, casehold_examples=2, billsum_examples=2,
                  deepspeed="null")
    values.update(extra)
    return [STAGE2, CONFIG, *(f"{k}={v}" for k, v in values.items())]


def model_variant(w: World, t: Path, edit: Callable[[dict, dict], None]) -> Path:
    """A copy of the tiny model whose tensors and/or config `edit(tensors, config)` changed in place."""
    folder = t / "variant"
    shutil.copytree(w.model, folder)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def truncated_model(w: World, t: Path) -> Path:
    folder = t / "truncated"
    shutil.copytree(w.model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def pickled_folder(w: World, t: Path) -> Path:
    folder = t / "pickled"
    shutil.copytree(w.model, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def no_weights(w: World, t: Path) -> Path:
    folder = t / "empty_model"
    shutil.copytree(w.model, folder)
    (folder / "model.safetensors").unlink()
    return folder


def gpt2_model(t: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = t / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(folder)
    return folder


def file_at(t: Path, name: str = "a_file", data: bytes = b"x") -> Path:
    (t / name).write_bytes(data)
    return t / name


def bad_utf8_data(t: Path, name: str = "casehold_test", bad_line: int = 2) -> Path:
    """A data root holding only `name`, with an invalid byte on `bad_line`."""
    root = t / "data"
    relative = manifest_entries()[name]["path"]
    lines = (data_dir() / relative).read_bytes().splitlines(keepends=True)[:3]
    lines[bad_line - 1] = lines[bad_line - 1][:20] + b"\xff\xfe" + lines[bad_line - 1][20:]
    (root / relative).parent.mkdir(parents=True)
    (root / relative).write_bytes(b"".join(lines))
    return root


def pickled_score_layout(t: Path) -> Path:
    """The original's Q/K/V/O/Gate/Up/Down/<layer>.pt layout whose first file pickles a non-tensor object."""
    from argparse import Namespace

    from dpruner.io import UPSTREAM_DUAL_DIRS

    folder = t / "upstream"
    for short in UPSTREAM_DUAL_DIRS:
        (folder / short).mkdir(parents=True)
        for layer in range(3):
            torch.save(torch.zeros(1), folder / short / f"{layer}.pt")
    torch.save(Namespace(code="not a tensor"), folder / "Q" / "0.pt")
    return folder


def short_casehold(t: Path) -> Path:
    relative = manifest_entries()["casehold_train"]["path"]
    path = t / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join((data_dir() / relative).read_bytes().splitlines(keepends=True)[:2]))
    return path


def result_file(w: World, t: Path, content) -> Path:
    folder = t / "results"
    shutil.copytree(w.results, folder)
    (folder / "dense" / "casehold.json").write_text(json.dumps(content))
    return folder


def yaml_file(t: Path, text: bytes) -> Path:
    return file_at(t, "config.yaml", text)


EVAL = "test_casehold.py"
PPL = "legal_perplexity_evaluation.py"
# name: (argv builder (world, case folder) -> [script, *args], text the one error line must contain)
CASES: dict[str, tuple[Callable[[World, Path], list], str]] = {
    # --- an output that is, contains or lies inside an input: refused even with --overwrite ---
    "stage1_out_is_model": (lambda w, t: ["general.py", w.model, "c4", "--out", w.model, "--overwrite"],
                            "is the model"),
    "stage1_save_pruned_is_model": (lambda w, t: ["general.py", w.model, "c4", "--out", t / "s", "--save-pruned",
                                                  w.model, "--overwrite"], "is the model"),
    "stage1_out_contains_model": (lambda w, t: ["general.py", w.model, "c4", "--out", w.root, "--overwrite"],
                                  "contains the model"),
    "baseline_out_is_model": (lambda w, t: ["prune_baseline.py", "magnitude", w.model, w.model, "--overwrite"],
                              "is the model"),
    "baseline_out_inside_model": (lambda w, t: ["prune_baseline.py", "magnitude", w.model, w.model / "sub",
                                                "--overwrite"], "lies inside the model"),
    "baseline_out_inside_data": (lambda w, t: ["prune_baseline.py", "magnitude", w.model, data_dir() / "pruned"],
                                 "lies inside the data folder"),
    "baseline_out_is_scores": (lambda w, t: ["prune_baseline.py", "dpruner", w.model, w.scores, "--scores", w.scores,
                                             "--overwrite"], "overlap"),
    "llm_pruner_out_is_model": (lambda w, t: ["prune_baseline.py", "llm-pruner", w.model, w.model, "--overwrite"],
                                "is the model"),
    "stage3_out_is_scores": (lambda w, t: ["save_model.py", w.model, w.scores, w.scores, "--overwrite"],
                             "is the importance"),
    "stage3_out_is_model": (lambda w, t: ["save_model.py", w.model, w.scores, w.model, "--overwrite"], "is the model"),
    "stage3_iterative_out_contains_scores": (lambda w, t: ["save_model_iterative.py", w.model, w.scores, w.root,
                                                           "--overwrite"], "contains the model"),
    "eval_out_inside_model": (lambda w, t: [EVAL, w.model, w.model, "--out", w.model / "r.json"], "lies inside"),
    "stage2_output_is_model": (lambda w, t: stage2(w, w.model, overwrite_output_dir="true"), "is the model"),
    "stage2_output_contains_general": (lambda w, t: stage2(w, w.root, overwrite_output_dir="true"), "contains the"),
    "tables_md_is_result": (lambda w, t: ["make_tables.py", w.results, "--domain", "legal", "--md",
                                          w.results / "dense" / "casehold.json"], "lies inside the results folder"),
    "analysis_out_inside_scores": (lambda w, t: ["analyze_masks.py", f"a={w.scores}", "--out", w.scores / "sub"],
                                   "lies inside the source 'a'"),
    "pickled_object_in_pt_scores": (lambda w, t: ["save_model.py", w.model, pickled_score_layout(t), t / "p"],
                                    "0.pt: cannot be read as a plain tensor file"),
    # --- the output location, checked before any heavy work ---
    "stage1_out_is_file": (lambda w, t: ["general.py", w.model, "c4", "--out", file_at(t), "--overwrite"], "is a file"),
    "baseline_out_below_file": (lambda w, t: ["prune_baseline.py", "magnitude", w.model, file_at(t) / "sub"],
                                "is a file, so nothing"),
    "eval_out_readonly": (lambda w, t: [EVAL, w.model, w.model, "--out", readonly_dir(t) / "x" / "r.json"],
                          "cannot write in"),
    "stage1_save_pruned_readonly": (lambda w, t: ["general.py", w.model, "c4", "--out", t / "s", "--save-pruned",
                                                  readonly_dir(t) / "p"], "cannot write in"),
    "stage3_out_readonly": (lambda w, t: ["save_model.py", w.model, w.scores, readonly_dir(t) / "p"],
                            "cannot write in"),
    "stage2_output_readonly": (lambda w, t: stage2(w, readonly_dir(t) / "o"), "cannot write in"),
    # --- strict model loading: never a partly random model, never a pickle ---
    "missing_tensor": (lambda w, t: ["save_model.py", model_variant(w, t, lambda s, c: s.pop(
        "model.layers.1.mlp.up_proj.weight")), w.scores, t / "p", "--allow-other-model"],
                       "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "more_layers_in_config": (lambda w, t: ["general.py", model_variant(w, t, lambda s, c: c.update(
        num_hidden_layers=4)), "c4", "--out", t / "s"], "num_hidden_layers=4 but the weights hold 3"),
    "mismatched_tensor": (lambda w, t: [PPL, w.model, model_variant(w, t, lambda s, c: s.update({
        "model.norm.weight": torch.ones(32)})), "--out", t / "r.json"], "model.norm.weight has shape [32]"),
    "unexpected_tensor": (lambda w, t: [PPL, w.model, model_variant(w, t, lambda s, c: s.update({
        "model.extra.weight": torch.ones(2)})), "--out", t / "r.json"], "model.extra.weight is not part"),
    "truncated_safetensors": (lambda w, t: [PPL, w.model, truncated_model(w, t), "--out", t / "r.json"],
                              "truncated"),
    "pickled_weights_folder": (lambda w, t: ["general.py", pickled_folder(w, t), "c4", "--out", t / "s"],
                               "only safetensors are loaded"),
    "pickled_model_file": (lambda w, t: ["prune_baseline.py", "magnitude", pickled_folder(w, t) / "pytorch_model.bin",
                                         t / "p"], "only safetensors are loaded"),
    "folder_without_weights": (lambda w, t: ["save_model.py", no_weights(w, t), w.scores, t / "p"], "holds no weights"),
    "stage2_gpt2": (lambda w, t: stage2(w, t / "o", model_name_or_path=gpt2_model(t)),
                    "unsupported architecture 'gpt2'"),
    # --- every number in range, NaN and inf never ---
    "blocksize_0": (lambda w, t: ["general.py", w.model, "c4", "--blocksize", "0"], "--blocksize must be >= 1, got 0"),
    "batch_size_0": (lambda w, t: ["general.py", w.model, "c4", "--batch-size", "0"], "--batch-size must be >= 1"),
    "percdamp_negative": (lambda w, t: ["prune_baseline.py", "sparsegpt", w.model, t / "p", "--percdamp", "-1"],
                          "--percdamp must be in [0, 1], got -1"),
    "percdamp_inf": (lambda w, t: ["general.py", w.model, "c4", "--percdamp", "inf"], "--percdamp=inf is not a finite"),
    "alpha_nan": (lambda w, t: ["prune_baseline.py", "mixcal", w.model, t / "p", "--calibration", "mix", "--domain",
                                "legal", "--alpha", "nan"], "--alpha=nan is not a finite number"),
    "blend_without_its_selection": (lambda w, t: ["prune_baseline.py", "dpruner-obs", w.model, t / "p", "--scores",
                                                  w.scores, "--selection", "mask", "--blend", "0.5"],
                                    "--blend only applies to --selection blend, not mask"),
    "blend_above_one": (lambda w, t: ["prune_baseline.py", "dpruner-obs", w.model, t / "p", "--scores", w.scores,
                                      "--selection", "blend", "--blend", "2"], "--blend must be in [0, 1], got 2.0"),
    "sparsity_nan": (lambda w, t: ["save_model.py", w.model, w.scores, t / "p", "--sparsity", "nan"], "--sparsity"),
    "nsamples_0": (lambda w, t: ["prune_baseline.py", "wanda", w.model, t / "p", "--nsamples", "0"], "--nsamples"),
    "eval_limit_0": (lambda w, t: [EVAL, w.model, w.model, "--limit", "0"], "--limit must be >= 1, got 0"),
    "eval_max_new_tokens_0": (lambda w, t: ["test_billsum.py", w.model, w.model, "--max-new-tokens", "0"],
                              "--max-new-tokens must be >= 1"),
    "analysis_blocks_0": (lambda w, t: ["analyze_masks.py", f"a={w.scores}", "--blocks", "0", "--out", t / "o"],
                          "--blocks must be >= 1"),
    "stage2_learning_rate_nan": (lambda w, t: stage2(w, t / "o", learning_rate="nan"), "learning_rate='nan'"),
    "stage2_warmup_nan": (lambda w, t: stage2(w, t / "o", warmup=".nan"), "warmup=nan must be a finite"),
    "stage2_lambda_nan": (lambda w, t: stage2(w, t / "o", regularizer_lambda="nan"), "regularizer_lambda"),
    "stage2_clip_nan": (lambda w, t: stage2(w, t / "o", clip_grad_norm="nan"), "clip_grad_norm"),
    "stage2_clip_inf": (lambda w, t: stage2(w, t / "o", clip_grad_norm=".inf"), "clip_grad_norm=inf"),
    "stage2_warmup_range": (lambda w, t: stage2(w, t / "o", warmup=1.5), "warmup=1.5 out of range"),
    # --- files: duplicate keys, bad bytes, wrong shapes ---
    "yaml_duplicate_key": (lambda w, t: [STAGE2, yaml_file(t, b"learning_rate: 0.1\nseed: 1\nlearning_rate: 0.2\n")],
                           "config.yaml:3: duplicate key 'learning_rate' (first given on line 1)"),
    "yaml_bad_utf8": (lambda w, t: [STAGE2, yaml_file(t, b"seed: 1\nmodel_name_or_path: caf\xe9\n")],
                      "config.yaml:2: not valid UTF-8"),
    "data_bad_utf8": (lambda w, t: [EVAL, w.model, w.model, "--data-dir", bad_utf8_data(t), "--limit", "3", "--out",
                                    t / "r.json"], "casehold_test.txt:2: not valid UTF-8"),
    "text_file_bad_utf8": (lambda w, t: ["medical_perplexity_evaluation.py", w.model, w.model, "--text-file",
                                         file_at(t, "h.txt", b"one\n\ntw\xc3o\n"), "--out", t / "r.json"],
                           "h.txt:3: not valid UTF-8"),
    "tables_metrics_missing": (lambda w, t: ["make_tables.py", result_file(w, t, {"metrics": {"acc": 1}}), "--domain",
                                             "legal"], "casehold.json: its metrics hold no value for 'CaseHOLD acc'"),
    "tables_not_an_object": (lambda w, t: ["make_tables.py", result_file(w, t, [1, 2]), "--domain", "legal"],
                             "casehold.json: expected an evaluation result"),
    "tables_metric_not_number": (lambda w, t: ["make_tables.py", result_file(w, t, {"metrics": {
        "accuracy": "high", "macro_f1": 0.1}}), "--domain", "legal"], "'CaseHOLD acc' is 'high'; expected a number"),
    "tables_percent_of_not_a_row": (lambda w, t: ["make_tables.py", w.results, "--domain", "legal", "--percent-of",
                                                  "wanda"], "percent_of='wanda' is not a row of the table"),
    # --- provenance: scores of another model with the same shapes ---
    "stage3_scores_of_other_model": (lambda w, t: ["save_model.py", w.model, w.other_scores, t / "p"],
                                     "was computed for another model"),
    "baseline_scores_of_other_model": (lambda w, t: ["prune_baseline.py", "dpruner", w.model, t / "p", "--scores",
                                                     w.other_scores], "--allow-other-model"),
    "stage2_general_of_other_model": (lambda w, t: stage2(w, t / "o", general_importance_dir=w.other_scores),
                                      "was computed for another model"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(case, world, tmp_path, capsys):
    build, expected = CASES[case]
    argv = build(world, tmp_path)
    roots = [world.root, tmp_path, *([data_dir()] if "data" in case else [])]
    before = snapshot(*roots)
    entries_before = {p for p in tmp_path.rglob("*")}
    result = run_inprocess(capsys, *argv)
    line = error_line(result)
    assert expected in line, line
    assert snapshot(*roots) == before
    assert {p for p in tmp_path.rglob("*")} <= entries_before, "a failed run left new files or folders"


def test_short_casehold_file_warns_like_billsum_and_pubmedqa(tmp_path, capsys):
    from dpruner.data.domain import training_texts
    from dpruner.data.spec import load_domain

    short_casehold(tmp_path)
    texts = training_texts(load_domain("legal"), tmp_path, {"casehold_examples": 500, "billsum_examples": 0})
    assert len(texts) == 2
    assert "casehold: 500 examples requested, only 2 available" in capsys.readouterr().err

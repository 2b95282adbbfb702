"""code/sweep.py on a tiny model: one sparsity sweep (magnitude + dpruner at two sparsities) checked for its
rows, the sparsities its pruning reports measured, the plot, resuming without recomputation and refusing
changed settings; one-line errors for bad input; and reproduce_tables.sh's argument handling."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CODE, REPO, error_line, make_tiny_llama, run_cli
from dpruner import cli
from dpruner.io import save_score_folder
from dpruner.models import decoder_layers, projection_modules
from dpruner.sweep import Point, SweepConfig, pareto_front

SPARSITIES = (0.3, 0.5)
LABELS = ["dense", *(f"{m}-s{s!r}" for m in ("magnitude", "dpruner") for s in SPARSITIES)]
TINY_SETTINGS = ["--nsamples", "2", "--seqlen", "32", "--ppl-limit", "2", "--ppl-max-length", "64",
                 "--ppl-stride", "32", "--choice-limit", "1", "--wiki-limit", "10", "--wiki-seqlen", "64"]


def random_scores(folder: Path) -> Path:
    """A score folder shaped like the tiny model's projections (dpruner's input)."""
    generator = torch.Generator().manual_seed(3)
    layers = [{name: torch.rand(linear.weight.shape, generator=generator)
               for name, linear in projection_modules(layer).items()} for layer in decoder_layers(make_tiny_llama())]
    return save_score_folder(folder, layers, kind="dual_importance", model="tiny", settings={})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_llama_dir):
    """The sweep's folder and arguments after one complete run."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["sparsity", tiny_llama_dir, "--domain", "legal", "--methods", "magnitude,dpruner",
            "--sparsities", ",".join(map(str, SPARSITIES)), "--scores", random_scores(root / "scores"),
            "--out", root / "out", *TINY_SETTINGS]
    result = run_cli("sweep.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out", args


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_results_have_one_row_per_point_with_the_reported_sparsity(sweep):
    out, _ = sweep
    rows = read_rows(out)
    assert [row["label"] for row in rows] == LABELS
    assert rows[0]["method"] == "dense" and float(rows[0]["sparsity"]) == 0.0
    for row in rows[1:]:
        method, sparsity = row["label"].split("-s")
        assert row["method"] == method and float(row["sparsity"]) == float(sparsity)
        report = json.loads((out / "reports" / f"{row['label']}.json").read_text())["sparsity"]
        assert float(row["projection_sparsity"]) == pytest.approx(report["projection_sparsity"], rel=1e-12)
        assert float(row["overall_sparsity"]) == pytest.approx(report["overall_sparsity"], rel=1e-12)
        assert float(row["projection_sparsity"]) == pytest.approx(float(sparsity), abs=1e-3)
    for row in rows:
        legal = json.loads((out / "eval" / row["label"] / "legal_perplexity.json").read_text())["metrics"]
        assert float(row["legal_ppl"]) == pytest.approx(legal["multilegalpile"]["ppl_window_mean"], rel=1e-12)
        assert 0.0 <= float(row["casehold_acc"]) <= 1.0 and float(row["wikitext_2_ppl"]) > 1.0
    assert not any((out / "models").iterdir()), "pruned models are deleted after evaluation"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(label in (out / "table.md").read_text() for label in LABELS[1:])


@pytest.mark.slow
def test_rerun_skips_finished_points(sweep):
    out, args = sweep
    results = sorted((out / "eval").glob("*/*.json"))
    before = {path: path.stat().st_mtime_ns for path in results}
    csv_before = (out / "results.csv").read_text()
    rerun = run_cli("sweep.py", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("[skip]") == len(LABELS)
    assert ": prune" not in rerun.stdout and ": evaluate" not in rerun.stdout
    assert {path: path.stat().st_mtime_ns for path in results} == before
    assert not any((out / "models").iterdir())
    assert (out / "results.csv").read_text() == csv_before


@pytest.mark.slow
def test_changed_setting_is_refused_before_any_work(sweep):
    out, args = sweep
    changed = list(args)
    changed[changed.index("--choice-limit") + 1] = "2"
    before = sorted(path.name for path in (out / "logs").iterdir())
    line = error_line(run_cli("sweep.py", *changed))
    assert "choice_limit: 1 -> 2" in line and "--fresh" in line
    assert sorted(path.name for path in (out / "logs").iterdir()) == before


def load_main():
    spec = importlib.util.spec_from_file_location("sweep_cli", CODE / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


BAD_INPUTS = {
    "unknown method": (["--methods", "magnitude,optimal"], "unknown method 'optimal'"),
    "sparsity 1": (["--methods", "magnitude", "--sparsities", "0.5,1"], "1 is outside [0, 1)"),
    "negative sparsity": (["--methods", "magnitude", "--sparsities", "-0.1"], "-0.1 is outside [0, 1)"),
    "not a number": (["--methods", "magnitude", "--sparsities", "half"], "'half' is not a number"),
    "empty methods": (["--methods", ","], "--methods is empty"),
    "empty sparsities": (["--methods", "magnitude", "--sparsities", ""], "--sparsities is empty"),
    "dpruner without scores": (["--methods", "magnitude,dpruner"], "dpruner needs --scores"),
    "scores without dpruner": (["--methods", "magnitude", "--scores", "{scores}"], "only read by methods dpruner, dpruner-obs"),
    "bad eval setting": (["--methods", "magnitude", "--ppl-stride", "600"], "--ppl-stride 600 must not exceed"),
    "blend above one": (["--methods", "magnitude", "--blends", "0.5,1.5"], "--blends: 1.5 is outside [0, 1]"),
}
BAD_LAMBDA_INPUTS = {
    "negative lambda": (["--lambdas", "0,-0.1"], "lambda must be >= 0, got -0.1"),
    "empty lambdas": (["--lambdas", ""], "--lambdas is empty"),
    "reserved train arg": (["--train-args", "output_dir=/tmp/x"], "--train-args sets output_dir"),
    "form in train args": (["--train-args", "regularizer=upstream"], "--train-args sets regularizer,"),
    "unknown form": (["--forms", "anchor,paper"], "--forms: unknown regularizer form 'paper'"),
    "none as a form": (["--forms", "none"], "--forms: unknown regularizer form 'none'"),
    "form twice": (["--forms", "anchor,anchor"], "--forms lists a value twice"),
    "unknown train arg": (["--train-args", "learning_rat=0.1"], "did you mean 'learning_rate'?"),
}


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory) -> Path:
    return random_scores(tmp_path_factory.mktemp("bad") / "scores")


@pytest.mark.parametrize("case", [*BAD_INPUTS, *BAD_LAMBDA_INPUTS])
def test_bad_input_gives_one_error_line_and_writes_nothing(case, tiny_llama_dir, scores_dir, tmp_path, capsys):
    kind = "sparsity" if case in BAD_INPUTS else "lambda"
    extra, message = BAD_INPUTS[case] if kind == "sparsity" else BAD_LAMBDA_INPUTS[case]
    extra = [value.format(scores=scores_dir) for value in extra]
    if kind == "lambda":
        extra += ["--general-importance", str(scores_dir)]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_main(), [kind, str(tiny_llama_dir), "--domain", "legal", "--out", str(out), *extra])
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


@pytest.mark.slow
def test_foreign_out_folder_is_refused_even_with_fresh(tiny_llama_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("not a sweep")
    line = error_line(run_cli("sweep.py", "sparsity", tiny_llama_dir, "--domain", "legal", "--methods", "magnitude",
                              "--out", tmp_path, "--fresh"))
    assert "holds no sweep.json" in line and (tmp_path / "keep.txt").exists()


def test_lambda_sweep_runs_stage2_per_form_and_lambda_and_masks_per_sparsity(tmp_path):
    config = SweepConfig(kind="lambda", model="m", domain="medical", out=tmp_path, sparsities=[0.4, 0.6],
                         lambdas=[0.0, 1.0], forms=["anchor", "upstream"], general_importance=tmp_path / "gi",
                         train_args=["max_steps=2"])
    points = config.points()
    assert [p.label for p in points] == ["dense", "lambda0.0-s0.4", "lambda0.0-s0.6", "anchor-lambda1.0-s0.4",
                                           "anchor-lambda1.0-s0.6", "upstream-lambda1.0-s0.4", "upstream-lambda1.0-s0.6"]
    runs = config.stage2_runs()
    assert [run.name for run in runs] == ["lambda0.0", "anchor-lambda1.0", "upstream-lambda1.0"]
    assert config.stage2_overrides(runs[0])[-3:] == ["max_steps=2", "regularizer=none", "regularizer_lambda=0.0"], \
        "lambda = 0 is one run without a regularizer, shared by the forms"
    assert config.stage2_overrides(runs[2])[-2:] == ["regularizer=upstream", "regularizer_lambda=1.0"]
    command = config.prune_command(points[-1], tmp_path / "model")
    assert command[1].endswith("save_model.py")
    importance = tmp_path / "lomo" / "upstream-lambda1.0" / "importance"
    assert command[3:] == [str(importance), str(tmp_path / "model"), "--sparsity", "0.6"]
    assert config.tasks() == ["medical_perplexity", "pubmedqa", "general_perplexity"]
    many = SweepConfig(kind="lambda", model="m", domain="medical", out=tmp_path, sparsities=[0.5],
                       lambdas=[0.0, 0.01, 0.1, 1.0], forms=["anchor", "squared_grad"], general_importance=tmp_path)
    paths = {many.stage2_recipe_path(run) for run in many.stage2_runs()}
    assert len(paths) == 7, "every (form, lambda) has its own stage-2 recipe file"
    assert many.recipe(many.points()[1])["stage2"]["regularizer"] == "none"


def test_forms_swept_in_separate_calls_share_one_results_table(tmp_path):
    """Each form may run on its own lambda grid in its own call; the results cover every finished point of
    the folder with this call's settings, and name the points computed otherwise instead of mixing them."""
    from dpruner.io import write_json
    from dpruner.sweep import _prepare, curve_forms, earlier_points

    def lambda_config(forms, lambdas, train_args=("max_steps=2",)):
        return SweepConfig(kind="lambda", model="m", domain="legal", out=tmp_path, sparsities=[0.5], lambdas=lambdas,
                           forms=forms, general_importance=tmp_path / "gi", train_args=list(train_args))

    first = lambda_config(["anchor"], [0.0, 10.0])
    _prepare(first, first.points())
    for point in first.points():  # what _run_point leaves: the recipe, then every task's result
        write_json(first.recipe_path(point), first.recipe(point))
        for task in first.tasks():
            write_json(first.result_path(point, task), {})
    other = lambda_config(["squared_grad"], [0.0, 1.0], train_args=("max_steps=3",))
    unfinished = other.points()[-1]
    write_json(other.recipe_path(unfinished), other.recipe(unfinished))

    second = lambda_config(["grad_penalty"], [0.0, 0.1])
    same, other_settings = earlier_points(second, second.points())
    assert [p.label for p in same] == ["anchor-lambda10.0-s0.5"], "lambda = 0 and dense are this call's own"
    assert same[0] == first.points()[-1]
    assert other_settings == ["squared_grad-lambda1.0-s0.5"], "other train_args: named, never mixed in"
    assert second.point_of(first.recipe(first.points()[-1])) == first.points()[-1]
    assert second.point_of(first.recipe(first.points()[0])) is None, "the dense recipe is no pruned point"
    rows = [{"method": p.method, "form": p.form} for p in [*second.points(), *same]]
    assert curve_forms(rows, second) == ["grad_penalty", "anchor"], "one trade-off curve per form of the folder"
    sparsity = SweepConfig(kind="sparsity", model="m", domain="legal", out=tmp_path, sparsities=[0.5],
                           methods=["magnitude"])
    assert sparsity.point_of(first.recipe(first.points()[-1])) is None, "another kind of sweep's point"


def test_every_form_passes_the_stage2_config_check(tiny_llama_dir, scores_dir, tmp_path):
    config = SweepConfig(kind="lambda", model=str(tiny_llama_dir), domain="legal", out=tmp_path, sparsities=[0.5],
                         lambdas=[0.0, 1.0], forms=["anchor", "grad_penalty", "squared_grad", "upstream"],
                         general_importance=scores_dir)
    config.check()


def test_tradeoff_curves_start_every_form_at_the_shared_lambda0():
    from dpruner.sweep import tradeoff_curves

    def row(form, lam, sparsity=0.5):
        return {"method": "dpruner", "form": form, "lambda": lam, "sparsity": sparsity}

    rows = [{"method": "dense", "form": "", "lambda": "", "sparsity": 0.0}, row("none", 0.0),
            row("upstream", 10.0), row("anchor", 10.0), row("anchor", 0.1), row("none", 0.0, 0.6)]
    curves = tradeoff_curves(rows, ["anchor", "upstream"])
    assert list(curves) == [("anchor", 0.5), ("anchor", 0.6), ("upstream", 0.5), ("upstream", 0.6)]
    assert [(r["form"], r["lambda"]) for r in curves["anchor", 0.5]] == [("none", 0.0), ("anchor", 0.1), ("anchor", 10.0)]
    assert [(r["form"], r["lambda"]) for r in curves["upstream", 0.5]] == [("none", 0.0), ("upstream", 10.0)]
    assert [r["lambda"] for r in curves["upstream", 0.6]] == [0.0]


def test_tradeoff_plot_of_a_sweep_with_only_its_dense_row_warns_nothing(tmp_path):
    """A resumed sweep replots after every point, so the first plot has the dense star and no curve."""
    import warnings

    from dpruner.sweep import _key, headline_columns, plot_tradeoff

    config = SweepConfig(kind="lambda", model="m", domain="legal", out=tmp_path, sparsities=[0.5], lambdas=[0.0, 1.0],
                         general_importance=tmp_path / "gi", split="validation")
    columns = [c for c in config.columns() if c.task == "general_validation_perplexity"] + [headline_columns(config)[0]]
    dense = {"method": "dense", "form": "", "lambda": "", "sparsity": 0.0}
    for column in columns:
        key = _key(column.title)
        dense.update({key: 20.0, key + "_ci95_low": 19.0, key + "_ci95_high": 21.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_tradeoff([dense], tmp_path / "tradeoff.png", config)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_validation_split_evaluates_only_validation_texts(tmp_path):
    config = SweepConfig(kind="lambda", model="m", domain="legal", out=tmp_path, sparsities=[0.5], lambdas=[0.0, 1.0],
                         general_importance=tmp_path / "gi", split="validation")
    assert config.tasks() == ["legal_validation_perplexity", "general_validation_perplexity"]
    domain_args = config.evaluation.task_args("legal_validation_perplexity")
    assert domain_args[:4] == ["--domain", "legal", "--task", "validation"]
    general = config.evaluation.task_args("general_validation_perplexity")
    assert general[:3] == ["--datasets", "wikitext2_validation", "c4"]
    assert [c.title for c in config.columns()] == ["Legal validation ppl", "WikiText-2 validation ppl",
                                                   "C4 held-out ppl"]
    point = config.points()[1]
    assert config.recipe(point)["split"] == "validation"
    assert "split" not in SweepConfig(kind="lambda", model="m", domain="legal", out=tmp_path, sparsities=[0.5],
                                      lambdas=[0.0], general_importance=tmp_path).recipe(point)


@pytest.mark.slow
def test_validation_sweep_scores_only_validation_texts(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("sweep.py", "sparsity", tiny_llama_dir, "--domain", "medical", "--methods", "magnitude",
                     "--sparsities", "0.5", "--split", "validation", "--out", out, *TINY_SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "eval" / "magnitude-s0.5").glob("*.json")) == [
        "general_validation_perplexity.json", "medical_validation_perplexity.json"]
    domain = json.loads((out / "eval" / "dense" / "medical_validation_perplexity.json").read_text())
    assert list(domain["metrics"]) == ["hqs_questions_validation"]
    general = json.loads((out / "eval" / "dense" / "general_validation_perplexity.json").read_text())
    assert list(general["metrics"]) == ["wikitext2_validation", "c4"]
    row = read_rows(out)[1]
    assert float(row["medical_validation_ppl"]) == pytest.approx(
        json.loads((out / "eval" / "magnitude-s0.5" / "medical_validation_perplexity.json").read_text())
        ["metrics"]["hqs_questions_validation"]["ppl_window_mean"], rel=1e-12)
    assert float(row["c4_held_out_ppl_ci95_low"]) <= float(row["c4_held_out_ppl"]) <= float(row["c4_held_out_ppl_ci95_high"])
    table = run_cli("make_tables.py", out / "eval", "--domain", "medical", "--split", "validation",
                    "--reference", "magnitude-s0.5")
    assert table.returncode == 0, table.stderr
    assert "Medical validation ppl" in table.stdout and "C4 held-out ppl" in table.stdout


def test_lambda_jaccard_is_the_pooled_jaccard_of_the_stage3_masks(tmp_path):
    from dpruner.masks import select
    from dpruner.sweep import update_lambda_jaccards

    config = SweepConfig(kind="lambda", model="m", domain="legal", out=tmp_path, sparsities=[0.5], lambdas=[0.0, 2.0],
                         general_importance=tmp_path / "gi")
    runs = dict(zip((0.0, 2.0), config.stage2_runs()))
    folders = {}
    for seed, lam in ((3, 0.0), (4, 2.0)):
        generator = torch.Generator().manual_seed(seed)
        layers = [{name: torch.rand(linear.weight.shape, generator=generator)
                   for name, linear in projection_modules(layer).items()} for layer in decoder_layers(make_tiny_llama())]
        folders[lam] = layers
        save_score_folder(config.stage2_dir(runs[lam]) / "importance", layers, kind="dual_importance", model="tiny",
                          settings={})
    update_lambda_jaccards(config, config.points())
    assert not (tmp_path / "jaccard").exists(), "nothing before stage 2 is complete"
    for lam in folders:
        (config.stage2_dir(runs[lam]) / "trainer_state.json").write_text(json.dumps({"complete": True}))
    update_lambda_jaccards(config, config.points())
    shared = union = 0
    for reference, other in zip(folders[0.0], folders[2.0]):
        for name in reference:
            a, b = select(reference[name], 0.5, scope="matrix"), select(other[name], 0.5, scope="matrix")
            shared += int((a & b).sum())
            union += int((a | b).sum())
    written = json.loads((tmp_path / "jaccard" / "anchor-lambda2.0-s0.5.json").read_text())
    assert written["jaccard"] == pytest.approx(shared / union, rel=1e-12)
    assert json.loads((tmp_path / "jaccard" / "lambda0.0-s0.5.json").read_text())["jaccard"] == 1.0


def test_dpruner_obs_points_run_prune_baseline_with_their_selection_and_domain_calibration(tmp_path):
    config = SweepConfig(kind="sparsity", model="m", domain="legal", out=tmp_path, sparsities=[0.5],
                         methods=["dpruner-obs", "dpruner-obs-saliency"], scores=tmp_path / "scores", nsamples=4,
                         seqlen=32)
    for method, selection in (("dpruner-obs", "mask"), ("dpruner-obs-saliency", "saliency")):
        command = config.prune_command(Point(f"{method}-s0.5", method, 0.5), tmp_path / "model")
        assert command[1].endswith("prune_baseline.py") and command[2] == "dpruner-obs"
        assert command[command.index("--selection") + 1] == selection
        assert command[command.index("--scores") + 1] == str(tmp_path / "scores")
        assert command[-4:] == ["--calibration", "mix", "--domain", "legal"]
        assert config.recipe(Point(f"{method}-s0.5", method, 0.5))["scores"] == str(tmp_path / "scores")


def test_blend_points_one_per_weight_each_with_its_own_recipe(tmp_path):
    config = SweepConfig(kind="sparsity", model="m", domain="medical", out=tmp_path, sparsities=[0.5],
                         methods=["mixcal", "dpruner-obs-blend"], blends=[0.25, 0.75], scores=tmp_path / "scores")
    points = config.points()
    assert [p.label for p in points] == ["dense", "mixcal-s0.5", "dpruner-obs-blend0.25-s0.5", "dpruner-obs-blend0.75-s0.5"]
    command = config.prune_command(points[-1], tmp_path / "model")
    assert command[2] == "dpruner-obs" and command[command.index("--selection") + 1] == "blend"
    assert command[command.index("--blend") + 1] == "0.75"
    assert command[-4:] == ["--calibration", "mix", "--domain", "medical"]
    assert [config.recipe(p).get("blend") for p in points] == [None, None, 0.25, 0.75]


def test_pareto_front_keeps_points_no_sparser_point_beats():
    points = [(0.0, 10.0), (0.3, 12.0), (0.3, 11.0), (0.5, 11.5), (0.5, 30.0), (0.7, 40.0), (0.6, 50.0)]
    assert pareto_front(points) == [0, 2, 3, 5]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "reproduce_tables.sh"), *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.slow
def test_reproduce_tables_help_and_bad_arguments():
    help_text = run_script("--help")
    assert help_text.returncode == 0 and "Usage: scripts/reproduce_tables.sh legal|medical" in help_text.stdout
    assert "domain-only" in help_text.stdout and "general-only" in help_text.stdout
    for args, message in ((["finance"], "first argument must be legal, medical or a domain YAML path"),
                          (["legal", "--bogus"], "unknown option --bogus")):
        result = run_script(*args)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr



STUB_EVALUATOR = """import os, sys
if sys.argv[1] == "-m":  # dpruner's own modules run for real
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
out = sys.argv[sys.argv.index("--out") + 1]
if os.path.basename(out) == os.environ.get("FAIL_ON", "") + ".json":
    sys.exit("stub evaluator: failing on purpose")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as handle:
    handle.write('{"stub": true}')
"""


def store_session(tmp_path: Path, calls: str, fail_on: str = "") -> subprocess.CompletedProcess:
    """scripts/_settings.sh sourced with EVAL_STORE set, then `calls` with a stub evaluator as PY (the real
    one lists the domain's tasks while the file is sourced)."""
    stub = tmp_path / "stub.py"
    stub.write_text(f"#!{sys.executable}\n{STUB_EVALUATOR}")
    stub.chmod(0o755)
    script = f'source scripts/_settings.sh legal --tiny --out "{tmp_path}/out" > /dev/null\nPY="{stub}"\n{calls}'
    env = {**os.environ, "EVAL_STORE": str(tmp_path / "store"), "FAIL_ON": fail_on}
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_eval_store_takes_only_whole_rows_and_skips_them_on_resume(tmp_path):
    """A row reaches EVAL_STORE only once every task is evaluated, so a run resumed on another machine
    never mixes two builds of one model in a row; a finished row is skipped."""
    failed = store_session(tmp_path, "evaluate_model sparsegpt MODEL_FOLDER", fail_on="general_perplexity")
    assert failed.returncode != 0
    assert not (tmp_path / "store" / "sparsegpt").exists()
    staged = sorted(p.name for p in (tmp_path / "out" / "eval" / "sparsegpt").glob("*.json"))
    assert staged and "general_perplexity.json" not in staged

    done = store_session(tmp_path, "evaluate_model sparsegpt MODEL_FOLDER; row_done sparsegpt && echo DONE")
    assert done.returncode == 0, done.stderr
    stored = sorted(p.name for p in (tmp_path / "store" / "sparsegpt").glob("*.json"))
    assert stored == sorted([*staged, "general_perplexity.json"]) and "DONE" in done.stdout
    assert [line.split("\t")[0] for line in (tmp_path / "store" / "rows.tsv").read_text().splitlines()] == ["sparsegpt"]
    assert not list((tmp_path / "store").glob(".*"))

    (tmp_path / "out").rename(tmp_path / "gone")  # a new machine: nothing but the store
    again = store_session(tmp_path, "evaluate_model sparsegpt MODEL_FOLDER; row_done dense || echo DENSE-MISSING",
                          fail_on="general_perplexity")
    assert again.returncode == 0, again.stderr
    assert "every evaluation is in" in again.stdout and "DENSE-MISSING" in again.stdout
    assert len((tmp_path / "store" / "rows.tsv").read_text().splitlines()) == 1

    other = subprocess.run(["bash", "-c", "source scripts/_settings.sh legal --quick --out " + str(tmp_path / "q")],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "EVAL_STORE": str(tmp_path / "store")})
    lines = [line for line in other.stderr.splitlines() if line.startswith("error:")]
    assert other.returncode == 2 and len(lines) == 1 and "holds rows of other settings" in lines[0]

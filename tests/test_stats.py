"""Bootstrap intervals and paired tests against independent references, and the tables that show them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpruner.errors import DPrunerError
from dpruner.stats import (bootstrap_ci, exp_mean_of, exp_weighted_mean, macro_f1_of, mean_and_sd, mean_of,
                           paired_bootstrap)
from dpruner.tables import build_table, load_results, seed_table, to_csv, to_markdown


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_equals_sklearn(seed):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    truth = rng.choice(["yes", "no", "maybe"], size=40, p=[0.6, 0.3, 0.1])
    guess = rng.choice(["yes", "no", "maybe", "other"], size=40)
    expected = f1_score(truth, guess, average="macro", zero_division=0)
    assert macro_f1_of("t", "p")({"t": truth, "p": guess}) == pytest.approx(expected, abs=1e-12)


def test_mean_interval_agrees_with_the_normal_approximation():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    interval = bootstrap_ci({"x": values}, mean_of("x"))
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.value == pytest.approx(values.mean())
    assert interval.low == pytest.approx(values.mean() - half, abs=0.03)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.03)


def test_perplexity_statistics_are_the_evaluator_formulas():
    nll, tokens = np.array([2.0, 3.0, 2.5]), np.array([10, 30, 20])
    assert exp_mean_of("nll")({"nll": nll}) == pytest.approx(math.exp(2.5))
    assert exp_weighted_mean("nll", "tokens")({"nll": nll, "tokens": tokens}) == pytest.approx(
        math.exp((20 + 90 + 50) / 60))


def test_paired_bootstrap_tells_a_shift_from_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=200)
    same = paired_bootstrap({"x": base}, {"x": base.copy()}, mean_of("x"))
    assert same.difference == 0 and same.low == 0 and same.high == 0 and not same.significant
    shifted = paired_bootstrap({"x": base}, {"x": base + 0.1}, mean_of("x"))
    assert shifted.significant and shifted.difference == pytest.approx(0.1) and shifted.p_value < 0.01
    noisy = paired_bootstrap({"x": base}, {"x": base + rng.normal(0, 1, size=200) + 0.01}, mean_of("x"))
    assert not noisy.significant and noisy.p_value > 0.05  # 0.01 inside noise of s.d. 1/sqrt(200)
    # the unpaired interval of the same shift is far wider: pairing is what makes it detectable
    assert bootstrap_ci({"x": base}, mean_of("x")).high - bootstrap_ci({"x": base}, mean_of("x")).low > 0.2


def test_stratified_bootstrap_keeps_every_group_size_and_reduces_to_the_plain_one():
    from dpruner.stats import _resample_indices

    strata = np.array([0] * 5 + [1] * 3 + [2] * 4)
    index = _resample_indices(len(strata), 200, 7, strata)
    assert all(np.bincount(strata[row], minlength=3).tolist() == [5, 3, 4] for row in index)
    assert np.array_equal(_resample_indices(12, 50, 7, np.zeros(12)), _resample_indices(12, 50, 7))
    with pytest.raises(DPrunerError, match="at least 2 units per group"):
        _resample_indices(3, 10, 0, [0, 0, 1])


def test_relative_perplexity_statistics_against_a_direct_computation():
    from dpruner.evaluation.relative_perplexity import compare, summarize

    rng = np.random.default_rng(4)

    def run(shift):
        return {name: {"examples": [{"dense_nll": float(d), "pruned_nll": float(d + shift + rng.normal(0, 0.5)),
                                     "tokens": 10} for d in rng.uniform(20, 30, size=12)]}
                for name in ("a", "b")}
    reference = run(1.0)
    summary = summarize(reference)
    for name, entry in reference.items():
        gap = sum(e["pruned_nll"] - e["dense_nll"] for e in entry["examples"]) / 120
        assert summary["relative_perplexity"][name]["value"] == pytest.approx(math.exp(gap), rel=1e-12)
    values = [summary["relative_perplexity"][n]["value"] for n in reference]
    assert summary["worst_domain"]["value"] == pytest.approx(max(values))
    assert summary["mean_relative_perplexity"]["value"] == pytest.approx(sum(values) / 2)
    same = compare(reference, reference)
    assert same["worst_domain"]["difference"] == 0 and not same["worst_domain"]["significant"]
    better = {n: {"examples": [{**e, "pruned_nll": e["pruned_nll"] - 5.0} for e in entry["examples"]]}
              for n, entry in reference.items()}
    assert compare(reference, better)["worst_domain"]["significant"]
    assert compare(reference, better)["worst_domain"]["difference"] < 0
    other = {n: {"examples": [{**e, "dense_nll": e["dense_nll"] + 1} for e in entry["examples"]]}
             for n, entry in reference.items()}
    with pytest.raises(DPrunerError, match="same held-out examples"):
        compare(reference, other)


def test_paired_bootstrap_needs_the_same_units():
    with pytest.raises(DPrunerError, match="same units"):
        paired_bootstrap({"x": [1.0, 2.0, 3.0]}, {"x": [1.0, 2.0]}, mean_of("x"))


def test_mean_and_sd_over_seeds():
    assert mean_and_sd([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, np.std([1.0, 2.0, 4.0], ddof=1)))
    with pytest.raises(DPrunerError, match="at least 2 seeds"):
        mean_and_sd([1.0])


def write_choice(folder, label: str, correct: list[bool], projection: float = 0.5) -> None:
    (folder / label).mkdir(parents=True)
    labels = ["a" if i % 2 else "b" for i in range(len(correct))]
    rows = [{"id": i, "label": lab, "prediction": lab if ok else ("b" if lab == "a" else "a")}
            for i, (lab, ok) in enumerate(zip(labels, correct))]
    (folder / label / "casehold.examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy = sum(correct) / len(correct)
    from sklearn.metrics import f1_score

    f1 = f1_score([r["label"] for r in rows], [r["prediction"] for r in rows], average="macro")
    (folder / label / "casehold.json").write_text(json.dumps({
        "task": "casehold", "metrics": {"accuracy": accuracy, "macro_f1": f1},
        "sparsity": {"projection_sparsity": projection, "overall_sparsity": projection * 0.8}}))


def test_table_cells_carry_intervals_and_paired_stars(tmp_path):
    rng = np.random.default_rng(3)
    reference = list(rng.random(200) < 0.5)
    write_choice(tmp_path, "dense", list(rng.random(200) < 0.7), projection=0.0)
    write_choice(tmp_path, "sparsegpt", reference)
    write_choice(tmp_path, "wanda", [not c if i < 3 else c for i, c in enumerate(reference)])  # 3 flips: noise
    write_choice(tmp_path, "magnitude", [False] * 200)  # far worse
    table = build_table(load_results(tmp_path), "legal", ["dense", "sparsegpt", "wanda", "magnitude"])
    markdown = to_markdown(table)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "[" in rows["SparseGPT"] and "*" not in rows["SparseGPT"]
    assert "*" not in rows["Wanda"]  # inside the noise: no difference
    assert rows["Magnitude"].count("*") == 2  # accuracy and F1 both differ
    assert "excludes 0" in markdown
    csv_lines = [line for line in to_csv(table).splitlines() if line.startswith("magnitude,") and "CaseHOLD acc" in line]
    assert ",sparsegpt," in csv_lines[0]


def test_table_refuses_units_that_differ_from_the_reference(tmp_path):
    write_choice(tmp_path, "sparsegpt", [True, False] * 20)
    write_choice(tmp_path, "wanda", [True, False] * 25)
    with pytest.raises(DPrunerError, match="units differ from the reference"):
        build_table(load_results(tmp_path), "legal", ["sparsegpt", "wanda"])


def test_seed_rows_are_summarised_as_mean_and_sd(tmp_path):
    accuracies = {1: [True] * 30 + [False] * 10, 2: [True] * 20 + [False] * 20, 3: [True] * 25 + [False] * 15}
    for seed, correct in accuracies.items():
        write_choice(tmp_path, f"sparsegpt~seed{seed}", correct)
    write_choice(tmp_path, "dense", [True] * 40, projection=0.0)
    results = load_results(tmp_path)
    assert [label for label, _, _ in build_table(results, "legal").rows] == ["dense"]  # seeds are not main rows
    mean, sd = np.mean([0.75, 0.5, 0.625]), np.std([0.75, 0.5, 0.625], ddof=1)
    assert f"| SparseGPT | 3 | {100 * mean:.2f} ± {100 * sd:.2f} |" in seed_table(results, "legal")
    write_choice(tmp_path, "sparsegpt", [True] * 35 + [False] * 5)  # the default-seed row joins its seeds
    values = [0.875, 0.75, 0.5, 0.625]
    assert f"| SparseGPT | 4 | {100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f} |" in \
        seed_table(load_results(tmp_path), "legal")


def test_seed_table_pairs_each_seed_with_the_reference_row_of_that_seed(tmp_path):
    """A claim over seeds counts the seeds whose paired bootstrap against the reference's row of the SAME
    seed excludes 0, and the percentage is of the --percent-of method's mean over its own seeds."""
    rng = np.random.default_rng(7)
    base = {suffix: list(rng.random(200) < 0.5) for suffix in ("", "~seed1", "~seed2")}
    for suffix, correct in base.items():
        write_choice(tmp_path, "sparsegpt" + suffix, correct)
    # far better at the default seed and seed 1, three flips (noise) at seed 2
    write_choice(tmp_path, "mixcal", [True] * 200)
    write_choice(tmp_path, "mixcal~seed1", [True] * 200)
    noisy = [not c if i < 3 else c for i, c in enumerate(base["~seed2"])]
    write_choice(tmp_path, "mixcal~seed2", noisy)
    results = load_results(tmp_path)
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in seed_table(results, "legal", reference="sparsegpt", percent_of="sparsegpt").splitlines()
            if line.startswith("| ")}
    mixcal_acc = rows["MixCal (C4 + domain Hessians)"].split(" | ")[2]
    assert "[better* in 2/3]" in mixcal_acc  # seed 2 is inside the noise, so it is not counted
    mixcal_mean = np.mean([1.0, 1.0, np.mean(noisy)])
    sparsegpt_mean = np.mean([np.mean(correct) for correct in base.values()])
    assert f"({100 * mixcal_mean / sparsegpt_mean:.1f}%)" in mixcal_acc
    assert "better*" not in rows["SparseGPT"] and "%)" not in rows["SparseGPT"]  # the reference is not paired with itself
    write_choice(tmp_path, "wanda~seed1", [True] * 200)  # no same-seed partner for every seed: counts only pairs
    write_choice(tmp_path, "wanda~seed3", [True] * 200)
    wanda = [line for line in seed_table(load_results(tmp_path), "legal", reference="sparsegpt").splitlines()
             if line.startswith("| Wanda")][0]
    assert "[better* in 1/1]" in wanda.split(" | ")[2]


def test_wikitext_validation_is_its_own_text():
    """Hyperparameters are chosen on WikiText-2 validation, which shares no row with the test text."""
    from dpruner.data import eval_sets

    test = eval_sets.wikitext2(limit=400).items[0]
    validation = eval_sets.wikitext2(limit=400, split="validation").items[0]
    assert test.name == "wikitext2" and validation.name == "wikitext2_validation"
    test_rows = {row for row in test.text.split("\n\n") if len(row) > 80}
    assert test_rows and not test_rows & set(validation.text.split("\n\n"))

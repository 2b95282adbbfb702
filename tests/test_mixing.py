"""Several stage-2 domains: the batch order, the draws, one-domain `constant` == the single-domain run,
and a two-domain DRO run that logs and reports every domain."""

from __future__ import annotations

import csv
import json
import signal
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from conftest import REPO, run_cli
from dpruner.config import load_config
from dpruner.errors import DPrunerError
from dpruner.mixing import DomainBatches, draw_domain
from dpruner.trainer import train
from dpruner.io import load_score_layers
from dpruner.trainer import KILL_AFTER_EPOCH_ENV
from test_train_lomo import assert_same_run, final_weights, overrides, stage2_inputs  # noqa: F401 (fixture)

CONFIG = REPO / "config" / "args_lomo.yaml"


@pytest.mark.parametrize("world_size", [1, 2])
def test_one_domain_batches_are_the_dataloader_batches(world_size):
    size, batch_size, epochs = 11, 3, 3
    for rank in range(world_size):
        sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=5)
        expected = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            expected += [batch.tolist() for batch in DataLoader(range(size), batch_size=batch_size, sampler=sampler)]
        batches = DomainBatches([size], batch_size, rank, world_size, seed=5)
        assert batches.steps_per_epoch * epochs == len(expected)
        assert [batches.take(0) for _ in expected] == expected


def test_domain_draws_follow_the_proportions_and_depend_only_on_the_step():
    proportions, draws = [0.6, 0.3, 0.1], 6000
    counts = Counter(draw_domain(proportions, seed=1, step=step) for step in range(1, draws + 1))
    for domain, share in enumerate(proportions):
        sigma = (draws * share * (1 - share)) ** 0.5
        assert abs(counts[domain] - draws * share) < 4 * sigma
    assert [draw_domain(proportions, 1, s) for s in (7, 8, 9)] == [draw_domain(proportions, 1, s) for s in (7, 8, 9)]


def _run(inputs, out, **extra):
    _, model, general = inputs
    config = load_config(CONFIG, overrides(model, general, out, **extra))
    return train(config)


def test_constant_one_domain_equals_the_single_domain_run(stage2_inputs, tmp_path):
    single = _run(stage2_inputs, tmp_path / "single")
    mixed = _run(stage2_inputs, tmp_path / "mixed", domains="[legal]", domain_mixing="constant",
                 domain_eval_examples=0)
    assert mixed["global_step"] == single["global_step"] and mixed["examples"] == single["examples"]
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "mixed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(load_score_layers(tmp_path / "single" / "importance"),
                    load_score_layers(tmp_path / "mixed" / "importance")):
        assert all(torch.equal(x[m], y[m]) for m in x)


@pytest.mark.parametrize("dro_loss", ["train", "validation"])
def test_two_domain_dro_run_logs_proportions_and_reports_every_domain(stage2_inputs, tmp_path, dro_loss):
    out = tmp_path / "dro"
    summary = _run(stage2_inputs, out, domains="[legal,medical]", domain_mixing="dro", dro_update_interval=1,
                   dro_loss=dro_loss,
                   domain_eval_examples=2, pubmedqa_examples=6, hqs_examples=4, max_steps=4,
                   domain_proportions="[0.5,0.5]")
    assert set(summary["domains"]) == {"legal", "medical"}
    assert sum(d["steps"] for d in summary["domains"].values()) == summary["global_step"] == 4
    relative = {name: d["relative_perplexity"] for name, d in summary["domains"].items()}
    worst = max(relative, key=relative.get)
    assert summary["worst_domain"] == {"name": worst, "relative_perplexity": relative[worst]}
    assert summary["mean_relative_perplexity"] == pytest.approx(sum(relative.values()) / 2)
    with open(out / "domain_proportions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["step"] == "0" and float(rows[0]["p_legal"]) == 0.5
    assert all(abs(float(r["p_legal"]) + float(r["p_medical"]) - 1) < 1e-5 for r in rows)
    final = summary["domains"]["legal"]["final_proportion"]
    assert float(rows[-1]["p_legal"]) == pytest.approx(final, abs=1e-6)
    assert (out / "domain_proportions.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["worst_domain"] == summary["worst_domain"]


def test_dro_run_resumes_after_a_kill_as_if_uninterrupted(stage2_inputs, tmp_path):
    _, model, general = stage2_inputs
    common = dict(num_train_epochs=2, max_steps="null", casehold_examples=5, billsum_examples=2, pubmedqa_examples=5,
                  hqs_examples=2, domains="[legal,medical]", domain_mixing="dro", dro_update_interval=2,
                  domain_eval_examples=1)
    full = _run(stage2_inputs, tmp_path / "full", **common)
    args = overrides(model, general, tmp_path / "resumed", **common)
    killed = run_cli("src/train_lomo.py", "config/args_lomo.yaml", *args, env={KILL_AFTER_EPOCH_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(load_config(CONFIG, args))
    assert resumed["resumed_from_epoch"] == 1
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    assert resumed["domains"] == full["domains"]
    assert (tmp_path / "full" / "domain_proportions.csv").read_text() == \
        (tmp_path / "resumed" / "domain_proportions.csv").read_text()


@pytest.mark.parametrize("extra,expect", [
    (["domains=[legal,nosuch]"], "domains: 'nosuch'"),
    (["domains=[legal,medical]", "domain_proportions=[1.0]"], "domain_proportions has 1 values for 2"),
    (["domains=[legal,medical]", "domain_proportions=[.nan, 1.0]"], "domain_proportions[0]=nan must be a finite number"),
    (["domain_mixing=dro"], "need `domains"),
    (["domains=[legal]", "dro_rho=-1"], "dro_rho=-1.0 out of range"),
    (["domains=legal"], "must be a list"),
    (["domains=[legal]", "domain_mixing=dro", "domain_eval_examples=0"], "needs dro_reference_losses or"),
])
def test_bad_multi_domain_keys_are_one_line_errors(extra, expect):
    with pytest.raises(DPrunerError, match=expect.replace("[", r"\[").replace("(", r"\(")):
        load_config(CONFIG, ["regularizer=none", *extra])


def test_domain_perplexity_of_the_dense_model_is_one_everywhere(stage2_inputs, tmp_path):
    _, model, _ = stage2_inputs
    out = tmp_path / "run"
    _run(stage2_inputs, out, domains="[legal,medical]", domain_eval_examples=2, pubmedqa_examples=6,
         hqs_examples=4, max_steps=1)
    done = run_cli("domain_perplexity.py", model, model, out, "--out", tmp_path / "ppl.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "ppl.json").read_text())
    assert set(result["domains"]) == {"legal", "medical"}
    assert all(entry["relative_perplexity"] == 1.0 for entry in result["domains"].values())
    intervals = result["intervals"]
    assert all(entry["ci95_low"] == entry["value"] == entry["ci95_high"] == 1.0
               for entry in intervals["relative_perplexity"].values())
    assert all(entry["held_out_examples"] == 2 for entry in result["domains"].values())


def test_domains_given_as_yaml_paths_are_shown_by_their_spec_name():
    from dpruner.mixing import domain_labels

    python_code = str(REPO / "examples" / "domains" / "python-code.yaml")
    assert domain_labels(["legal", python_code, "medical"]) == ["legal", "python-code", "medical"]
    with pytest.raises(DPrunerError, match="name the same domain twice"):
        domain_labels(["legal", str(REPO / "config" / "domains" / "legal.yaml")])

"""OWL non-uniform layer sparsity: the outlier ratio, the block-sparsity formula, and the exact
overall sparsity for every unstructured method."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import error_line, run_cli, save_tiny_llama
from dpruner.io import load_tensors
from dpruner.methods import get_method
from dpruner.models import PROJECTIONS, decoder_layers
from dpruner.owl import OwlProfile, block_sparsities, outlier_ratio
from dpruner.pipeline import CalibrationSpec, prune_with_method

LAYERS = 5  # with hidden 64 / MLP 128 the group quantum is 64; 0.6 * 64 * 5 and 0.7 * 64 * 5 are integers
OUTLIER_BLOCK = 1


def test_outlier_ratio_counts_entries_above_m_times_the_common_mean():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 21.0]]), torch.tensor([[1.0, 1.0, 1.0, 9.0]])]
    # mean = 36 / 8 = 4.5; above 2 x 4.5 = 9: only 21 (9 is not above)
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 1.0) == pytest.approx(2 / 8)


def test_block_sparsities_follow_owl_and_sum_exactly():
    ratios = list(np.random.default_rng(0).uniform(0, 0.02, size=12))
    target, lam, quantum = 0.7, 0.08, 64
    got = block_sparsities(ratios, target, lam, quantum)
    # OWL's own steps (luuyin/OWL, llm-compressor): min-max scale to [0, 2 lambda], centre on 1 - target
    r = np.array(ratios)
    keep = (r - r.min()) / (r.max() - r.min()) * lam * 2
    reference = 1 - (keep - keep.mean() + (1 - target))
    assert np.abs(np.array(got) - reference).max() <= 1 / quantum
    assert sum(round(s * quantum) for s in got) == round(target * quantum * len(ratios))
    assert all(math.floor(s * n) == round(s * quantum) * n // quantum for s in got for n in (64, 4096, 64 * 128))
    assert got[int(np.argmax(ratios))] == min(got) and got[int(np.argmin(ratios))] == max(got)


def test_equal_ratios_give_the_uniform_profile():
    assert all(s == pytest.approx(0.5) for s in block_sparsities([0.01] * 4, 0.5, 0.08, 64))


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory, embedded_model):
    """A tiny model whose block OUTLIER_BLOCK has a few huge weights (many Wanda outliers)."""
    path = save_tiny_llama(tmp_path_factory.mktemp("owl") / "model", num_hidden_layers=LAYERS)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        up = decoder_layers(model)[OUTLIER_BLOCK].mlp.up_proj.weight
        up[:, :8] *= 30
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name, target", [("magnitude", 0.6), ("wanda", 0.7), ("sparsegpt", 0.6),
                                          ("dpruner", 0.7)])
def test_overall_sparsity_is_exactly_the_target(name, target, outlier_model, tmp_path):
    options = {"blocksize": 32} if name == "sparsegpt" else {}
    if name == "dpruner":  # D-Pruner's scores, here magnitude's, saved by a first run
        prune_with_method(str(outlier_model), get_method("magnitude", sparsity=target), None,
                          scores_out=tmp_path / "scores", save_pruned=None)
        options = {"scores": tmp_path / "scores"}
    method = get_method(name, sparsity=target, **options)
    result = prune_with_method(str(outlier_model), method, CalibrationSpec(nsamples=4, seqlen=32),
                               scores_out=None, save_pruned=tmp_path / "pruned", profile=OwlProfile(m=5, lam=0.08))
    weights = load_tensors(tmp_path / "pruned" / "model.safetensors")
    zeros = total = 0
    for index, sparsity in enumerate(result["owl"]["layer_sparsity"]):
        layer = [weights[f"model.layers.{index}.{module}.weight"] for module in PROJECTIONS]
        layer_zeros = sum(int((w == 0).sum()) for w in layer)
        layer_total = sum(w.numel() for w in layer)
        assert layer_zeros == math.floor(layer_total * sparsity), index  # each block at its own ratio
        zeros, total = zeros + layer_zeros, total + layer_total
    assert Fraction(zeros, total) == Fraction(target).limit_denominator(1000)
    sparsities = result["owl"]["layer_sparsity"]
    assert min(sparsities) == sparsities[OUTLIER_BLOCK] < max(sparsities)  # the outlier block is spared
    assert max(sparsities) - min(sparsities) <= 2 * 0.08 + 1 / result["owl"]["quantum"]


def test_uniform_profile_is_unchanged(outlier_model, tmp_path):
    a = prune_with_method(str(outlier_model), get_method("magnitude", sparsity=0.5), None, scores_out=None,
                          save_pruned=tmp_path / "uniform")
    assert "owl" not in a
    assert a["settings"].get("sparsity_profile") is None


def test_bad_owl_options_give_one_line(tiny_llama_dir, tmp_path):
    result = run_cli("prune_baseline.py", "wanda", tiny_llama_dir, tmp_path / "out", "--pattern", "2:4",
                     "--sparsity-profile", "owl", "--nsamples", "2", "--seqlen", "16")
    assert "needs unstructured sparsity" in error_line(result)
    result = run_cli("prune_baseline.py", "magnitude", tiny_llama_dir, tmp_path / "out", "--sparsity", "0.95",
                     "--sparsity-profile", "owl")
    assert "outside [0, 1)" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_sweep_passes_the_profile_and_calibration_to_every_method(tmp_path):
    from dpruner.sweep import Point, SweepConfig

    config = SweepConfig(kind="sparsity", model="m", domain="legal", out=tmp_path, sparsities=[0.6],
                         methods=["magnitude", "dpruner", "wanda"], scores=tmp_path / "scores", nsamples=8, seqlen=64,
                         sparsity_profile="owl")
    for method in ("magnitude", "dpruner", "wanda"):
        point = Point(f"{method}-s0.6", method, 0.6)
        command = config.prune_command(point, tmp_path / "out")
        assert command[command.index("--sparsity-profile") + 1] == "owl"
        assert command[command.index("--nsamples") + 1] == "8" and command[command.index("--seqlen") + 1] == "64"
        assert config.recipe(point)["sparsity_profile"] == "owl"
    uniform = SweepConfig(kind="sparsity", model="m", domain="legal", out=tmp_path, sparsities=[0.6],
                          methods=["magnitude"])
    assert "--sparsity-profile" not in uniform.prune_command(Point("magnitude-s0.6", "magnitude", 0.6), tmp_path)
    assert "sparsity_profile" not in uniform.recipe(Point("magnitude-s0.6", "magnitude", 0.6))

"""Stage 1 (`code/general.py`): sequential propagation, determinism, resume after a kill, bad inputs."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import error_line, make_tiny_llama, run_cli
from dpruner.io import ScoreSet, load_tensors
from dpruner.layerwise import KILL_AFTER_LAYER_ENV, prune_layerwise
from dpruner.methods.sparsegpt import SparseGPT
from dpruner.models import PROJECTIONS, decoder_layers

SMALL = ("--nsamples", "4", "--seqlen", "32", "--blocksize", "32")


class RecordingSparseGPT(SparseGPT):
    """SparseGPT that remembers the Hessian each linear was pruned with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def hessian(self, stats):
        H = super().hessian(stats)
        self.seen.append(H.clone())
        return H


def layer_input_hessian(model, input_ids, layer_index: int, module: str) -> torch.Tensor:
    """H = 2/n sum x x^T of one linear's inputs, from a plain full-model forward."""
    linear = dict(decoder_layers(model)[layer_index].named_modules())[module]
    total = torch.zeros(linear.in_features, linear.in_features)

    def accumulate(_module, args, _output) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        total.add_(x.T @ x)

    handle = linear.register_forward_hook(accumulate)
    with torch.no_grad():
        model(input_ids, use_cache=False)
    handle.remove()
    return total * 2 / input_ids.shape[0]


def test_layer_l_plus_1_is_calibrated_on_pruned_layer_l():
    model = make_tiny_llama(num_hidden_layers=2)
    dense = make_tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 1000, (6, 24), generator=torch.Generator().manual_seed(0))
    method = RecordingSparseGPT(sparsity=0.5, blocksize=32)
    prune_layerwise(model, method, {"c4": ids}, batch_size=4, progress=False)
    seen_layer1_q = method.seen[len(PROJECTIONS)]  # first linear of layer 1 is q_proj
    expected = layer_input_hessian(model, ids, 1, "self_attn.q_proj")  # inputs after pruned layer 0
    torch.testing.assert_close(seen_layer1_q, expected, rtol=1e-4, atol=1e-4)
    unpruned = layer_input_hessian(dense, ids, 1, "self_attn.q_proj")
    assert not torch.allclose(seen_layer1_q, unpruned, rtol=1e-3, atol=1e-3)


def test_scores_are_saliencies_of_every_projection(tiny_llama_dir, tmp_path):
    out = tmp_path / "scores"
    result = run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--out", out, "--save-pruned", tmp_path / "pruned")
    assert result.returncode == 0, result.stderr
    scores = ScoreSet.open(out)
    assert scores.num_layers == 3 and scores.manifest["complete"]
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    for index, layer in enumerate(decoder_layers(pruned)):
        tensors = scores.layer(index)
        assert sorted(tensors) == sorted(PROJECTIONS)
        for name, linear in layer.named_modules():
            if name in tensors:
                assert tensors[name].shape == linear.weight.shape and tensors[name].dtype == torch.float32
                assert torch.isfinite(tensors[name]).all() and (tensors[name] >= 0).all()
    report = json.loads((tmp_path / "pruned" / "pruning_report.json").read_text())
    assert report["sparsity"]["projection_sparsity"] == pytest.approx(0.52, abs=0.005)


def score_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("layer_*.safetensors"))}


def test_same_seed_gives_identical_score_files(tiny_llama_dir, tmp_path):
    for name in ("a", "b"):
        result = run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--out", tmp_path / name)
        assert result.returncode == 0, result.stderr
    assert score_bytes(tmp_path / "a") == score_bytes(tmp_path / "b")
    other = run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--seed", "1", "--out", tmp_path / "c")
    assert other.returncode == 0, other.stderr
    assert score_bytes(tmp_path / "a") != score_bytes(tmp_path / "c")


def test_resume_after_kill_gives_identical_result(tiny_llama_dir, tmp_path):
    args = (tiny_llama_dir, "c4", *SMALL)
    full = run_cli("general.py", *args, "--out", tmp_path / "full", "--save-pruned", tmp_path / "full_model")
    assert full.returncode == 0, full.stderr

    killed = run_cli("general.py", *args, "--out", tmp_path / "resumed", "--save-pruned", tmp_path / "resumed_model",
                     env={KILL_AFTER_LAYER_ENV: "1"})
    assert killed.returncode == -signal.SIGKILL
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["layers_done"] == 2 and not manifest["complete"]
    assert not (tmp_path / "resumed_model").exists()

    resumed = run_cli("general.py", *args, "--out", tmp_path / "resumed", "--save-pruned", tmp_path / "resumed_model")
    assert resumed.returncode == 0, resumed.stderr
    assert score_bytes(tmp_path / "full") == score_bytes(tmp_path / "resumed")
    full_weights = load_tensors(tmp_path / "full_model" / "model.safetensors")
    resumed_weights = load_tensors(tmp_path / "resumed_model" / "model.safetensors")
    assert full_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)


def test_complete_output_is_not_overwritten(tiny_llama_dir, tmp_path):
    out = tmp_path / "scores"
    assert run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--out", out).returncode == 0
    before = score_bytes(out)
    result = run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--seed", "3", "--out", out)
    assert "--overwrite" in error_line(result)
    assert score_bytes(out) == before
    again = run_cli("general.py", tiny_llama_dir, "c4", *SMALL, "--seed", "3", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert score_bytes(out) != before


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, embedded_model) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corrupt_data_dir(tmp_path_factory) -> Path:
    from dpruner.paths import data_dir

    root = tmp_path_factory.mktemp("data")
    shutil.copytree(data_dir() / "general", root / "general")
    sample = root / "general" / "c4_sample_200.jsonl"
    lines = sample.read_text().splitlines(keepends=True)
    lines[2] = '{"text": "cut off in the mid\n'
    sample.write_text("".join(lines))
    return root


@pytest.mark.parametrize("case", ["missing_model", "not_llama", "sparsity_high", "sparsity_negative",
                                  "unknown_dataset", "corrupt_data"])
def test_bad_inputs_give_one_line_and_write_nothing(case, tiny_llama_dir, gpt2_dir, corrupt_data_dir, tmp_path):
    out = tmp_path / "scores"
    model, dataset, extra = str(tiny_llama_dir), "c4", []
    expect = {"missing_model": "does not exist", "not_llama": "unsupported architecture 'gpt2'",
              "sparsity_high": "--sparsity must be in [0, 1)", "sparsity_negative": "--sparsity must be in [0, 1)",
              "unknown_dataset": "unknown calibration dataset 'wikitext'",
              "corrupt_data": "c4_sample_200.jsonl:3: malformed JSON"}[case]
    if case == "missing_model":
        model = str(tmp_path / "no_such_model")
    elif case == "not_llama":
        model = str(gpt2_dir)
    elif case == "sparsity_high":
        extra = ["--sparsity", "1.0"]
    elif case == "sparsity_negative":
        extra = ["--sparsity", "-0.1"]
    elif case == "unknown_dataset":
        dataset = "wikitext"
    else:
        extra = ["--data-dir", str(corrupt_data_dir)]
    result = run_cli("general.py", model, dataset, *SMALL, *extra, "--out", out, "--save-pruned", tmp_path / "m")
    assert expect in error_line(result)
    assert not out.exists() and not (tmp_path / "m").exists()


def test_help_documents_every_option_with_default():
    result = run_cli("general.py", "--help")
    assert result.returncode == 0
    for option in ("--sparsity", "--nsamples", "--seqlen", "--blocksize", "--percdamp", "--seed", "--out",
                   "--save-pruned", "--overwrite", "--windowing", "--c4-source", "--true-sequential"):
        assert option in result.stdout
    assert "(default: 0.52)" in result.stdout and "(default: 128)" in result.stdout
    assert "original" in result.stdout


@pytest.mark.slow
def test_stage1_on_embedded_model(embedded_model, tmp_path):
    result = run_cli("general.py", "smollm2-135m", "c4", "--nsamples", "2", "--seqlen", "64", "--out", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    scores = ScoreSet.open(tmp_path / "s")
    assert scores.num_layers == 30
    last = scores.layer(29)
    assert last["mlp.down_proj"].shape == (576, 1536) and torch.isfinite(last["mlp.down_proj"]).all()

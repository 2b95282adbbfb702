"""Post-training baselines behind one interface (magnitude, Wanda, SparseGPT, MixCal, D-Pruner's scores),
N:M patterns, calibration sets, and the `code/prune_baseline.py` CLI.

Masks are checked against brute-force references: pure-Python sorts of (score, flat index) per
comparison group, with Wanda's input norms computed from the inputs captured by a plain forward pass.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import CODE, error_line, make_tiny_llama, run_cli
from dpruner import cli
from dpruner.errors import DPrunerError
from dpruner.io import ScoreSet, load_tensors, save_score_folder
from dpruner.layerwise import prune_layerwise
from dpruner.methods import get_method
from dpruner.methods.wanda import Wanda
from dpruner.models import PROJECTIONS, decoder_layers, load_tokenizer, projection_modules
from dpruner.data.domain import calibration_texts
from dpruner.data.spec import load_domain
from dpruner.pipeline import CalibrationSpec, build_calibration
from dpruner.stage3 import apply_scores

SMALL = ("--nsamples", "4", "--seqlen", "32")
MIX_LEGAL = ("--calibration", "mix", "--domain", "legal")


def token_ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def projections(model) -> dict[str, torch.Tensor]:
    """`<layer>.<module>` -> weight, for every prunable projection."""
    return {f"{i}.{name}": linear.weight.detach().clone()
            for i, layer in enumerate(decoder_layers(model)) for name, linear in projection_modules(layer).items()}


def lowest_in_groups(scores: list[float], groups: list[list[int]], count: int) -> set[int]:
    """Pure-Python reference: per group, sort (score, flat index) and take the first `count`."""
    pruned: set[int] = set()
    for group in groups:
        pruned.update(index for _, index in sorted((scores[i], i) for i in group)[:count])
    return pruned


def zero_set(weight: torch.Tensor) -> set[int]:
    return {i for i, value in enumerate(weight.flatten().tolist()) if value == 0.0}


def random_score_folder(folder: Path, model, seed: int = 0, signed: bool = False) -> Path:
    gen = torch.Generator().manual_seed(seed)
    layers = [{name: torch.rand(linear.weight.shape, generator=gen) - (0.5 if signed else 0.0)
               for name, linear in projection_modules(layer).items()} for layer in decoder_layers(model)]
    return save_score_folder(folder, layers, kind="dual_importance", model="tiny", settings={})


# --- masks against brute force -------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_magnitude_prunes_smallest_abs_per_matrix(sparsity):
    model = make_tiny_llama(num_hidden_layers=2)
    before = projections(model)
    prune_layerwise(model, get_method("magnitude", sparsity=sparsity), None, progress=False)
    for key, weight in projections(model).items():
        values = [abs(v) for v in before[key].flatten().tolist()]
        expected = lowest_in_groups(values, [list(range(len(values)))], int(len(values) * sparsity))
        assert zero_set(weight) == expected, key
        kept = weight != 0
        assert torch.equal(weight[kept], before[key][kept])


def captured_inputs(model, ids: torch.Tensor, layer_index: int) -> dict[str, torch.Tensor]:
    """Every token entering each projection of one layer, from a plain forward pass: name -> [tokens, in]."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in PROJECTIONS}
    def keep(_module, args, _output, name: str) -> None:
        seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [linear.register_forward_hook(lambda m, a, o, name=name: keep(m, a, o, name))
               for name, linear in projection_modules(decoder_layers(model)[layer_index]).items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks).double() for name, chunks in seen.items()}


def test_wanda_prunes_lowest_weight_times_input_norm_per_row():
    model = make_tiny_llama(num_hidden_layers=2)
    dense = copy.deepcopy(model)
    ids = token_ids(6, 24, seed=1)
    sparsity = 0.5
    prune_layerwise(model, get_method("wanda", sparsity=sparsity), {"c4": ids}, batch_size=4, progress=False)
    inputs = captured_inputs(dense, ids, 0)  # layer 0 sees the same inputs before and after pruning
    for name, linear in projection_modules(decoder_layers(dense)[0]).items():
        norms = [float(v) for v in inputs[name].pow(2).sum(dim=0).sqrt()]
        rows, cols = linear.weight.shape
        weights = linear.weight.flatten().tolist()
        scores = [abs(w) * norms[i % cols] for i, w in enumerate(weights)]
        groups = [list(range(r * cols, (r + 1) * cols)) for r in range(rows)]
        pruned = projection_modules(decoder_layers(model)[0])[name].weight
        assert zero_set(pruned) == lowest_in_groups(scores, groups, int(cols * sparsity)), name


class RecordingWanda(Wanda):
    """Wanda that remembers the squared input norms each linear was scored with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[tuple[int, str], torch.Tensor] = {}

    def scores(self, layer, module_name, weight, stats):
        self.seen[(layer, module_name)] = stats["c4"].sq_norms.clone()
        return super().scores(layer, module_name, weight, stats)


def test_wanda_layer_l_plus_1_is_calibrated_on_pruned_layer_l():
    model = make_tiny_llama(num_hidden_layers=2)
    dense = copy.deepcopy(model)
    ids = token_ids(6, 24, seed=0)
    method = RecordingWanda(sparsity=0.5)
    prune_layerwise(model, method, {"c4": ids}, batch_size=4, progress=False)
    seen = method.seen[(1, "self_attn.q_proj")].double()
    after_pruned = captured_inputs(model, ids, 1)["self_attn.q_proj"].pow(2).sum(dim=0)
    torch.testing.assert_close(seen, after_pruned, rtol=1e-4, atol=1e-4)
    dense_norms = captured_inputs(dense, ids, 1)["self_attn.q_proj"].pow(2).sum(dim=0)
    assert not torch.allclose(seen, dense_norms, rtol=1e-3, atol=1e-3)


# --- N:M for every method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "mixcal", "dpruner", "dpruner-obs"])
def test_n_m_prunes_exactly_n_of_every_m_inputs(name, pattern, tmp_path):
    model = make_tiny_llama(num_hidden_layers=2)
    n, m = (int(x) for x in pattern.split(":"))
    options: dict = {"pattern": pattern}
    calibration = {"c4": token_ids(4, 16, seed=0)}
    if name in ("mixcal", "dpruner-obs"):
        calibration = {"general": token_ids(4, 16, seed=0), "domain": token_ids(4, 16, seed=1)}
    if name in ("dpruner", "dpruner-obs"):
        options["scores"] = random_score_folder(tmp_path / "scores", model)
    method = get_method(name, sparsity=n / m, **options)
    prune_layerwise(model, method, calibration if method.statistic else None, progress=False)
    for key, weight in projections(model).items():
        rows, cols = weight.shape
        assert torch.all((weight == 0).reshape(rows, cols // m, m).sum(dim=-1) == n), key


def test_dpruner_method_equals_stage3_on_the_same_scores(tmp_path):
    model = make_tiny_llama(num_hidden_layers=2)
    reference = copy.deepcopy(model)
    folder = random_score_folder(tmp_path / "scores", model, seed=3)
    prune_layerwise(model, get_method("dpruner", sparsity=0.52, scores=folder), None, progress=False)
    apply_scores(reference, ScoreSet.open(folder), 0.52)
    assert all(torch.equal(a, b) for a, b in zip(projections(model).values(), projections(reference).values()))


@pytest.mark.parametrize("selection", ["mask", "saliency", "blend"])
def test_dpruner_obs_keeps_the_dual_selection_and_compensates(selection, tmp_path):
    """selection=mask prunes exactly stage 3's weights; both forms update the kept weights (OBS)."""
    model = make_tiny_llama(num_hidden_layers=2)
    original, stage3 = projections(model), copy.deepcopy(model)
    folder = random_score_folder(tmp_path / "scores", model, seed=5)
    sets = {"general": token_ids(4, 24, seed=0), "domain": token_ids(4, 24, seed=1)}
    prune_layerwise(model, get_method("dpruner-obs", sparsity=0.5, scores=folder, selection=selection), sets,
                    batch_size=4, progress=False)
    apply_scores(stage3, ScoreSet.open(folder), 0.5)
    for key, weight in projections(model).items():
        kept = weight != 0
        assert int((~kept).sum()) == weight.numel() // 2, key
        if selection == "mask":
            assert torch.equal(kept, projections(stage3)[key] != 0), key
        assert not torch.equal(weight[kept], original[key][kept]), key


def test_dpruner_obs_blend_ends_are_mixcal_and_the_saliency_selection(tmp_path):
    model = make_tiny_llama(num_hidden_layers=2)
    folder = random_score_folder(tmp_path / "scores", model, seed=6)
    sets = {"general": token_ids(4, 24, seed=0), "domain": token_ids(4, 24, seed=1)}
    mixcal = pruned_weights(get_method("mixcal", sparsity=0.5), sets)
    saliency = pruned_weights(get_method("dpruner-obs", sparsity=0.5, scores=folder, selection="saliency"), sets)
    for blend, expected in ((0.0, mixcal), (1.0, saliency)):
        ends = pruned_weights(get_method("dpruner-obs", sparsity=0.5, scores=folder, selection="blend", blend=blend),
                              sets)
        assert all(torch.equal(ends[k], expected[k]) for k in ends), blend
    for bad in (1.5, float("nan")):
        with pytest.raises(DPrunerError, match="--blend must be in"):
            get_method("dpruner-obs", sparsity=0.5, scores=folder, selection="blend", blend=bad)
    with pytest.raises(DPrunerError, match="--blend only applies to --selection blend"):
        get_method("dpruner-obs", sparsity=0.5, scores=folder, selection="mask", blend=0.5)
    signed = random_score_folder(tmp_path / "signed", model, seed=7, signed=True)
    with pytest.raises(DPrunerError, match="negative ones"):
        pruned_weights(get_method("dpruner-obs", sparsity=0.5, scores=signed), sets)


# --- MixCal -----------------------------------------------------------------------------------------------

def pruned_weights(method, calibration) -> dict[str, torch.Tensor]:
    model = make_tiny_llama(num_hidden_layers=2)
    prune_layerwise(model, method, calibration, batch_size=4, progress=False)
    return projections(model)


def test_mixcal_endpoints_are_sparsegpt_on_one_set_and_between_differs():
    general, domain = token_ids(4, 24, seed=0), token_ids(4, 24, seed=1)
    sets = {"general": general, "domain": domain}
    sparsegpt_general = pruned_weights(get_method("sparsegpt", sparsity=0.5), {"c4": general})
    sparsegpt_domain = pruned_weights(get_method("sparsegpt", sparsity=0.5), {"legal": domain})
    alpha_one = pruned_weights(get_method("mixcal", sparsity=0.5, alpha=1.0), sets)
    alpha_zero = pruned_weights(get_method("mixcal", sparsity=0.5, alpha=0.0), sets)
    between = pruned_weights(get_method("mixcal", sparsity=0.5, alpha=0.5), sets)
    assert all(torch.equal(alpha_one[k], sparsegpt_general[k]) for k in alpha_one)
    assert all(torch.equal(alpha_zero[k], sparsegpt_domain[k]) for k in alpha_zero)
    assert not any(torch.equal(between[k], alpha_one[k]) for k in between)


# --- calibration sets ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return load_tokenizer(str(embedded_model))


def test_mix_splits_one_budget_between_c4_and_domain(tokenizer):
    spec = CalibrationSpec(dataset="mix", domain="medical", nsamples=5, seqlen=32)
    pooled = build_calibration(spec, tokenizer)
    split = build_calibration(spec, tokenizer, ("general", "domain"))
    assert list(pooled) == ["mix"] and pooled["mix"].shape == (5, 32)
    assert split["general"].shape == (2, 32) and split["domain"].shape == (3, 32)
    assert torch.equal(pooled["mix"], torch.cat([split["general"], split["domain"]]))
    c4_only = build_calibration(CalibrationSpec(dataset="c4", nsamples=2, seqlen=32), tokenizer)["c4"]
    assert torch.equal(split["general"], c4_only)
    medical_only = build_calibration(CalibrationSpec(dataset="medical", nsamples=3, seqlen=32), tokenizer)["medical"]
    assert torch.equal(split["domain"], medical_only)


def test_domain_windows_come_from_the_stage2_training_text(tokenizer):
    windows = build_calibration(CalibrationSpec(dataset="medical", nsamples=3, seqlen=32), tokenizer)["medical"]
    stream = tokenizer("\n\n".join(calibration_texts(load_domain("medical")))).input_ids
    starts = {tuple(stream[i:i + 32]) for i in range(len(stream) - 32)}
    assert all(tuple(window.tolist()) in starts for window in windows)


# --- the CLI -----------------------------------------------------------------------------------------------

CLI_RUNS = {
    "magnitude": ("--save-scores", "{tmp}/magnitude_scores"),
    "wanda": (*SMALL, "--calibration", "legal", "--pattern", "2:4"),
    "sparsegpt": SMALL,  # the C4 half of the mixcal run below: same windows
    "mixcal": ("--nsamples", "8", "--seqlen", "32", *MIX_LEGAL, "--alpha", "1"),
    "dpruner": ("--scores", "{tmp}/magnitude_scores"),  # after magnitude, on its saved scores
}


@pytest.fixture(scope="module")
def cli_outputs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("baselines")
    outputs = {}
    for method, extra in CLI_RUNS.items():
        out = tmp / method
        result = run_cli("prune_baseline.py", method, tiny_llama_dir, out, *(a.format(tmp=tmp) for a in extra))
        assert result.returncode == 0, result.stderr
        assert f"pruned model: {out}" in result.stdout
        outputs[method] = out
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CLI_RUNS))
def test_cli_writes_a_plain_hf_model_with_its_sparsity(method, cli_outputs):
    from transformers import AutoModelForCausalLM

    out = cli_outputs[method]
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == method
    assert report["sparsity"]["projection_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert (report["settings"].get("calibration") is None) == (method in ("magnitude", "dpruner"))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(token_ids(1, 8, seed=0)).logits).all()


@pytest.mark.slow
def test_cli_mixcal_alpha_one_is_sparsegpt_on_the_same_c4_windows(cli_outputs):
    mixcal = load_tensors(cli_outputs["mixcal"] / "model.safetensors")
    sparsegpt = load_tensors(cli_outputs["sparsegpt"] / "model.safetensors")
    assert all(torch.equal(mixcal[k], sparsegpt[k]) for k in mixcal)


@pytest.mark.slow
def test_cli_dpruner_on_magnitude_scores_is_magnitude(cli_outputs):
    assert ScoreSet.open(cli_outputs["magnitude"].parent / "magnitude_scores").manifest["kind"] == "magnitude_scores"
    dpruner = load_tensors(cli_outputs["dpruner"] / "model.safetensors")
    magnitude = load_tensors(cli_outputs["magnitude"] / "model.safetensors")
    assert all(torch.equal(dpruner[k], magnitude[k]) for k in dpruner)


def load_cli_module():
    spec = importlib.util.spec_from_file_location("prune_baseline", CODE / "prune_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.run(load_cli_module().main, argv)
    return exited.value.code, capsys.readouterr().err


BAD_INPUTS = {
    "unknown_method": (["pruneall"], "invalid choice: 'pruneall'"),
    "sparsity_high": (["wanda", "--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    "sparsity_negative": (["magnitude", "--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    "alpha_high": (["mixcal", *MIX_LEGAL, "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    "alpha_negative": (["mixcal", *MIX_LEGAL, "--alpha", "-0.2"], "--alpha must be in [0, 1]"),
    "alpha_wrong_method": (["wanda", "--alpha", "0.3"], "--alpha applies to mixcal, dpruner-obs, not wanda"),
    "n_m_sparsity_mismatch": (["sparsegpt", "--pattern", "2:4", "--sparsity", "0.6"],
                              "--sparsity 0.6 conflicts with --pattern 2:4, which prunes exactly 0.5"),
    "n_m_not_dividing": (["wanda", "--pattern", "3:5", "--sparsity", "0.6"], "has 64 inputs, not a multiple of M=5"),
    "bad_pattern": (["magnitude", "--pattern", "half"], "pattern 'half' is not 'unstructured' or N:M"),
    "dpruner_without_scores": (["dpruner"], "method dpruner needs --scores DIR"),
    "dpruner_missing_scores": (["dpruner", "--scores", "{tmp}/no_scores"], "no_scores does not exist"),
    "mixcal_without_mix": (["mixcal"], "it needs --calibration mix"),
    "mix_without_domain": (["wanda", "--calibration", "mix"], "--calibration mix needs --domain"),
    "domain_conflict": (["wanda", "--calibration", "legal", "--domain", "medical"],
                        "--domain medical conflicts with --calibration legal"),
    "scores_into_out": (["magnitude", "--save-scores", "{out}/scores"], "overlap; use separate folders"),
    "structured_n_m": (["llm-pruner", "--pattern", "2:4"], "--pattern must be unstructured"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_give_one_error_line_and_write_nothing(case, tiny_llama_dir, tmp_path, capsys):
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    method, *options = (a.format(tmp=tmp_path, out=out) for a in args)
    code, stderr = run_in_process([method, str(tiny_llama_dir), str(out), *SMALL, *options], capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == cli.EXIT_USER_ERROR and len(lines) == 1, stderr
    assert expected in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bad_input_from_the_shell(tiny_llama_dir, tmp_path):
    result = run_cli("prune_baseline.py", "mixcal", tiny_llama_dir, tmp_path / "out", "--alpha", "2")
    assert "--alpha must be in [0, 1], got 2.0" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_llm_pruner_gets_the_same_calibration_windows(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    calls = []

    def fake_prune_structured(model_name, out, **kwargs):
        calls.append((model_name, out, kwargs))
        return {"pruned_model": str(out)}

    monkeypatch.setitem(sys.modules, "dpruner.structured",
                        types.SimpleNamespace(prune_structured=fake_prune_structured))
    out = tmp_path / "out"
    code, stderr = run_in_process(["llm-pruner", str(tiny_llama_dir), str(out), "--sparsity", "0.2", *SMALL], capsys)
    assert code == 0, stderr
    (model_name, called_out, kwargs), = calls
    assert model_name == str(tiny_llama_dir) and called_out == out.resolve()
    assert kwargs["target_ratio"] == 0.2 and not kwargs["overwrite"]
    expected = build_calibration(CalibrationSpec(nsamples=4, seqlen=32), load_tokenizer(str(tiny_llama_dir)))
    assert kwargs["calibration"].keys() == expected.keys()
    assert torch.equal(kwargs["calibration"]["c4"], expected["c4"])


def test_help_documents_defaults_and_origins():
    result = run_cli("prune_baseline.py", "--help")
    assert result.returncode == 0
    for text in ("magnitude", "wanda", "sparsegpt", "mixcal", "dpruner", "llm-pruner", "--pattern", "--calibration",
                 "--alpha", "--scores", "--save-scores", "(default: 0.5)", "(default: 128)", "(default: 2048)",
                 "SparseGPT", "Wanda", "2502.18424"):
        assert text in result.stdout, text

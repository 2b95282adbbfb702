"""Architectures users bring: tiny random Qwen2 (attention bias), Qwen3 (q/k norms), Mistral (sliding
window) and Llama-3-style GQA (large vocabulary, tied and untied head) through stages 1-3 and one
evaluation; Phi-3's fused projections and mixture-of-experts models are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import CODE, error_line, run_cli
from dpruner.config import load_config
from dpruner.errors import DPrunerError
from dpruner.io import ScoreSet
from dpruner.layerwise import capture_layer0_inputs, run_layer
from dpruner.methods.sparsegpt import SparseGPT
from dpruner.models import decoder_layers, load_model, projection_modules
from dpruner.pipeline import CalibrationSpec, check_model_structure, prune_with_method
from dpruner.stage3 import prune_from_scores
from dpruner.trainer import train

SPARSITY = 0.5
# Llama-3's tokenizer size; the head and embedding dominate such a small model.
LLAMA3_VOCAB = 128256
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
ARCHITECTURES = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),  # q/k/v biases by construction
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=8, tie_word_embeddings=False),  # shorter than --seqlen
    "llama3-gqa-tied": dict(model_type="llama", vocab_size=LLAMA3_VOCAB, num_attention_heads=8,
                            num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True),
    "llama3-gqa-untied": dict(model_type="llama", vocab_size=LLAMA3_VOCAB, num_attention_heads=8,
                              num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
}


def save_tiny(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A random model of `model_type` with the embedded model's tokenizer (so every CLI can run it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dpruner.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    params = dict(TINY, vocab_size=len(tokenizer)) | overrides
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **params))
    if model_type == "qwen2":  # random (non-zero) biases, so keeping them intact is visible
        for layer in decoder_layers(model):
            for proj in ("q_proj", "k_proj", "v_proj"):
                torch.nn.init.normal_(getattr(layer.self_attn, proj).bias, std=0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def pipeline_run(request, tmp_path_factory, embedded_model):
    """Stages 1, 2, 3 and legal perplexity on one tiny architecture."""
    spec = dict(ARCHITECTURES[request.param])
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny(root / "model", spec.pop("model_type"), **spec)
    prune_with_method(str(model_dir), SparseGPT(SPARSITY, blocksize=32),
                      CalibrationSpec(nsamples=4, seqlen=32), scores_out=root / "general", save_pruned=None,
                      kind="general_importance")
    config = load_config(CODE.parent / "config" / "args_lomo.yaml", [
        f"model_name_or_path={model_dir}", f"general_importance_dir={root / 'general'}",
        f"output_dir={root / 'lomo'}", "max_steps=2", "per_device_train_batch_size=2", "data_max_length=48",
        "casehold_examples=4", "billsum_examples=2", "deepspeed=null"])
    train(config)
    prune_from_scores(str(model_dir), root / "lomo" / "importance", root / "pruned", sparsity=SPARSITY)
    spec_file = importlib.util.spec_from_file_location("legal_ppl", CODE / "legal_perplexity_evaluation.py")
    evaluation = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(evaluation)
    evaluation.main([str(model_dir), str(root / "pruned"), "--limit", "2", "--max-length", "64", "--stride", "32",
                     "--batch-size", "2", "--out", str(root / "ppl.json")])
    return request.param, model_dir, root


def test_driver_inputs_match_the_models_own_hidden_states(pipeline_run):
    """Captured layer-0 kwargs (rotary embeddings, causal / sliding-window masks) reproduce the model."""
    _, model_dir, _ = pipeline_run
    model = load_model(str(model_dir), dtype="float32", device="cpu")
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    inputs = capture_layer0_inputs(model, ids, 2, torch.device("cpu"))
    for index, layer in enumerate(decoder_layers(model)[:-1]):  # the last state has the final norm applied
        inputs = run_layer(layer, inputs)
        torch.testing.assert_close(inputs.batches[0], hidden[index + 1], rtol=1e-5, atol=1e-5)


def test_stage3_masks_the_lowest_importance_and_keeps_everything_else(pipeline_run):
    name, model_dir, root = pipeline_run
    original = load_model(str(model_dir), dtype="float32", device="cpu")
    pruned = load_model(str(root / "pruned"), dtype="float32", device="cpu")
    assert pruned.config.model_type == original.config.model_type
    scores = ScoreSet.open(root / "lomo" / "importance")
    for index, (a, b) in enumerate(zip(decoder_layers(original), decoder_layers(pruned))):
        projections = projection_modules(a)
        tensors = scores.layer(index)
        for module, linear in projections.items():
            flat = tensors[module].flatten()
            k = int(flat.numel() * SPARSITY)
            expected = torch.zeros_like(flat, dtype=torch.bool)
            expected[torch.argsort(flat, stable=True)[:k]] = True  # independent reference: a stable sort
            expected_weight = linear.weight.detach().flatten().masked_fill(expected, 0).reshape(linear.weight.shape)
            assert torch.equal(dict(b.named_modules())[module].weight, expected_weight), f"{name} {index} {module}"
        pruned_params = dict(b.named_parameters())
        for param_name, param in a.named_parameters():  # biases, norms, q/k norms: untouched
            if param_name.removesuffix(".weight") not in projections:
                assert torch.equal(pruned_params[param_name], param), f"{name} {index} {param_name}"
    assert torch.equal(pruned.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert torch.equal(pruned.lm_head.weight, original.lm_head.weight)
    tied = pruned.lm_head.weight.data_ptr() == pruned.get_input_embeddings().weight.data_ptr()
    assert tied == bool(original.config.tie_word_embeddings)
    if name == "qwen2":
        assert all(layer.self_attn.q_proj.bias.abs().sum() > 0 for layer in decoder_layers(pruned))


def test_evaluation_reports_a_finite_perplexity(pipeline_run):
    _, _, root = pipeline_run
    result = json.loads((root / "ppl.json").read_text())
    ppl = result["metrics"]["multilegalpile"]["ppl_window_mean"]
    assert math.isfinite(ppl) and ppl > 1
    assert result["sparsity"]["projection_sparsity"] == pytest.approx(SPARSITY, abs=1e-3)


@pytest.mark.parametrize("model_type, overrides, expected", [
    ("phi3", {}, "fused projections self_attn.qkv_proj, mlp.gate_up_proj are not supported"),
    ("mixtral", {"num_local_experts": 4}, "mixture-of-experts MLPs (4 experts) are not supported"),
    ("qwen2_moe", {"num_experts": 4}, "mixture-of-experts MLPs (4 experts) are not supported"),
])
def test_fused_and_moe_models_are_refused_in_one_line(model_type, overrides, expected, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **TINY, vocab_size=256, **overrides).save_pretrained(tmp_path)
    with pytest.raises(DPrunerError) as err:
        check_model_structure(str(tmp_path))
    message = str(err.value)
    assert expected in message and model_type in message and "\n" not in message


def test_fused_model_refused_by_the_cli_before_any_output(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("phi3", **TINY, vocab_size=256).save_pretrained(tmp_path / "phi3")
    result = run_cli("general.py", tmp_path / "phi3", "c4", "--out", tmp_path / "scores")
    assert "fused projections" in error_line(result)
    assert not (tmp_path / "scores").exists()

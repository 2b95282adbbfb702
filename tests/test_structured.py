"""The LLM-Pruner-style structured baseline (`dpruner.structured`) on tiny GQA Llamas.

Slicing is checked against the same computation done by zeroing the removed heads' o_proj columns and
the removed channels' down_proj columns in the original model (equal only if q/k/v/o and gate/up/down
were cut consistently, GQA grouping included), importance against a per-group loop over gradients
from an independent autograd pass, and the saved folder with plain `AutoModelForCausalLM`.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from conftest import make_tiny_llama, save_tiny_llama
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME
from dpruner.models import count_parameters, decoder_layers, projection_modules
from dpruner.structured import (GroupLayout, RemovalPlan, apply_plan, group_layout, plan_removal, prune_structured,
                                taylor_importance)

# 8 query heads sharing 4 KV heads (2 per group), head_dim 16 != hidden 64 / 8 heads: exercises GQA
# grouping and the explicit head_dim of the pruned config. LlamaConfig rejects 6 heads (64 % 6 != 0),
# so removing exactly 1 KV group is not allowed.
GQA = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def windows(vocab: int, shapes: list[tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"set{i}": torch.randint(0, vocab, shape, generator=generator) for i, shape in enumerate(shapes)}


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, embedded_model):
    return save_tiny_llama(tmp_path_factory.mktemp("gqa_llama"), **GQA)


def test_pruned_folder_loads_and_meets_target(gqa_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(gqa_dir)
    layout = group_layout(original)
    target = 0.7 * layout.max_removable / layout.total_params
    calibration = windows(original.config.vocab_size, [(3, 24), (2, 16)])
    report = prune_structured(str(gqa_dir), tmp_path / "out", target_ratio=target, calibration=calibration,
                              device="cpu")

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert count_parameters(pruned) == report["parameters_after"]
    assert report["parameters_before"] == count_parameters(original)
    assert abs(report["achieved_ratio"] - target) <= layout.removed(0, 1) / 2 / layout.total_params
    config = pruned.config
    assert config.head_dim == 16
    assert layout.attention_removals == (0, 2, 3)
    assert config.num_key_value_heads == 4 - report["attention_groups_removed_per_layer"]
    assert config.num_attention_heads == 2 * config.num_key_value_heads
    assert config.intermediate_size == 128 - report["mlp_channels_removed_per_layer"]
    assert report["attention_groups_removed_per_layer"] >= 1 and report["mlp_channels_removed_per_layer"] >= 1
    with torch.no_grad():
        logits = pruned(torch.tensor([[1, 5, 9, 200]])).logits
    assert logits.shape[-1] == original.config.vocab_size and torch.isfinite(logits).all()

    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["method"] == "llm-pruner" and "no LoRA" in saved["recovery"]
    assert saved["calibration"] == {"set0": [3, 24], "set1": [2, 16]}
    channels = report["mlp_channels_removed_per_layer"]
    assert [entry["mlp_channels_removed"] for entry in saved["per_layer"]] == [channels] * 3


def test_slicing_equals_zeroing_the_removed_groups(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(**GQA)
    reference = copy.deepcopy(model)
    layout = group_layout(model)
    generator = torch.Generator().manual_seed(1)
    # Distinct scores: each layer drops a different pair of the 4 KV groups and 40 random channels.
    dropped = [[0, 1], [1, 2], [0, 3]]
    scores = [{"attention": torch.tensor([0.0 if g in pair else 1.0 + g for g in range(4)]),
               "mlp": torch.randperm(128, generator=generator).float()} for pair in dropped]
    removed = apply_plan(model, layout, RemovalPlan(attention_groups=2, mlp_channels=40), scores)

    with torch.no_grad():
        for entry, layer in zip(removed, decoder_layers(reference)):
            assert entry["attention_groups_removed"] == dropped[entry["layer"]]
            proj = projection_modules(layer)
            for group in entry["attention_groups_removed"]:  # 2 query heads x 16 dims per group
                proj["self_attn.o_proj"].weight[:, group * 32:(group + 1) * 32] = 0
            channels = torch.argsort(scores[entry["layer"]]["mlp"])[:40]
            proj["mlp.down_proj"].weight[:, channels] = 0
        ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=generator)
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)

        model.save_pretrained(tmp_path / "sliced")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert count_parameters(reference) - count_parameters(model) == layout.removed(2, 40)


def test_importance_matches_per_group_brute_force():
    model = make_tiny_llama(attention_bias=True, mlp_bias=True, **GQA)
    with torch.no_grad():  # nonzero biases, so their terms count
        for p in model.parameters():
            if p.dim() == 1 and not p.any():
                p.normal_(0, 0.02)
    calibration = list(windows(model.config.vocab_size, [(3, 12), (2, 8)]).values())
    # 2 windows of 12 / 3 of 8 tokens per batch: several batches, a partial one at the end of each set.
    scores = taylor_importance(model, calibration, tokens_per_batch=24)

    params = [p for layer in decoder_layers(model) for linear in projection_modules(layer).values()
              for p in linear.parameters()]
    total = sum(w.shape[0] * (w.shape[1] - 1) for w in calibration)
    loss = sum(model(input_ids=w, labels=w).loss * w.shape[0] * (w.shape[1] - 1) for w in calibration) / total
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params)))

    def term(param: torch.Tensor, index) -> float:
        return float((param.detach() * grads[id(param)])[index].abs().sum())

    for layer, score in zip(decoder_layers(model), scores):
        proj = projection_modules(layer)
        q, k, v, o = (proj[f"self_attn.{n}_proj"] for n in "qkvo")
        attention = []
        for group in range(4):
            qs, kv = slice(group * 32, (group + 1) * 32), slice(group * 16, (group + 1) * 16)
            attention.append(term(q.weight, qs) + term(q.bias, qs) + term(k.weight, kv) + term(k.bias, kv)
                             + term(v.weight, kv) + term(v.bias, kv) + term(o.weight, (slice(None), qs)))
        gate, up, down = proj["mlp.gate_proj"], proj["mlp.up_proj"], proj["mlp.down_proj"]
        mlp = [term(gate.weight, c) + term(gate.bias, c) + term(up.weight, c) + term(up.bias, c)
               + term(down.weight, (slice(None), c)) for c in range(128)]
        torch.testing.assert_close(score["attention"], torch.tensor(attention), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(score["mlp"], torch.tensor(mlp), rtol=1e-4, atol=1e-9)
        assert score["mlp"].min() > 0


def test_split_is_proportional_and_meets_target():
    layout = GroupLayout(num_layers=2, num_heads=8, num_kv_heads=4, head_dim=4, intermediate_size=100,
                         attention_group_params=40, mlp_channel_params=3, total_params=2000,
                         attention_removals=(0, 1, 2, 3))
    # 400 of 920 prunable parameters: 0.43 of 4 KV groups -> 2 groups (160), 40 channels (240) fill the rest.
    assert plan_removal(layout, 0.2) == RemovalPlan(attention_groups=2, mlp_channels=40)
    assert plan_removal(layout, 0.0) == RemovalPlan(0, 0)
    # 200: proportional 0.87 -> 1 group (80) + 20 channels; when the config rejects 1, 0 groups + 33 channels.
    assert plan_removal(layout, 0.1) == RemovalPlan(1, 20)
    assert plan_removal(dataclasses.replace(layout, attention_removals=(0, 2, 3)), 0.1) == RemovalPlan(0, 33)
    # Near the bound the MLP cannot absorb the rest alone: all 3 removable groups go.
    top = plan_removal(layout, layout.max_removable / layout.total_params)
    assert top == RemovalPlan(attention_groups=3, mlp_channels=99)


@pytest.mark.parametrize("ratio, message", [(-0.1, "must be in"), (1.0, "must be in"), (float("nan"), "must be in"),
                                            (0.5, "unreachable")])
def test_bad_target_ratio(gqa_dir, tmp_path, ratio, message):
    with pytest.raises(DPrunerError, match=message) as err:
        prune_structured(str(gqa_dir), tmp_path / "out", target_ratio=ratio, calibration=windows(100, [(1, 8)]),
                         device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_calibration_and_existing_output(gqa_dir, tmp_path):
    for calibration, message in [({}, "empty"), ({"c4": torch.zeros(4)}, "integer tensor"),
                                 ({"c4": torch.full((1, 8), 10**7)}, "outside the vocabulary")]:
        with pytest.raises(DPrunerError, match=message):
            prune_structured(str(gqa_dir), tmp_path / "out", target_ratio=0.01, calibration=calibration, device="cpu")
    (tmp_path / "out").mkdir()
    with pytest.raises(DPrunerError, match="already exists"):
        prune_structured(str(gqa_dir), tmp_path / "out", target_ratio=0.01, calibration=windows(100, [(1, 8)]),
                         device="cpu")

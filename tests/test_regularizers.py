"""The general-importance regularizer forms against independent references: exact zero at step 1,
autograd / finite differences for the gradients, and the scale-free normalisation of G."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_llama, save_tiny_llama
from dpruner.config import load_config
from dpruner.errors import DPrunerError
from dpruner.importance import (DOUBLE_BACKWARD_ATTENTION, DualImportance, ImportanceSettings, normalize_general, pretrained_anchors,
                                projection_target)
from dpruner.layerwise import prune_layerwise
from dpruner.lomo import GradContext, Lomo, Phase
from dpruner.methods.sparsegpt import SparseGPT
from test_lomo import batches, random_general

LAM = 0.1


def context(step: int = 1, lr: float = 0.03, phase: Phase = Phase.UPDATE) -> GradContext:
    return GradContext(phase, step, lr, lr, 1.0, False)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("anchor_step", ["proximal", "explicit"])
def test_anchor_term_is_exactly_zero_at_step_one(stored, anchor_step, tmp_path, embedded_model):
    """W0 comes from the checkpoint in the weights' own dtype: before any update W - W0 == 0 exactly,
    also when the checkpoint is bf16 and training runs in fp32 (the bug: W0 rounded to bf16)."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_llama(tmp_path / "model", seed=3)
    AutoModelForCausalLM.from_pretrained(folder, dtype=stored).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    named = dict(model.named_parameters())
    general = random_general(model, scale=1e3)
    anchors = pretrained_anchors(folder, named)
    callback = DualImportance(ImportanceSettings("anchor", LAM, anchor_step=anchor_step), named, general, anchors)
    gen = torch.Generator().manual_seed(0)
    for name in general:
        assert torch.equal(anchors[name], named[name].data)
        g = torch.randn(named[name].shape, generator=gen)
        refined = g.clone()  # the callback refines in place: this is the gradient that is scored
        returned = callback(name, named[name], refined, context())
        assert torch.equal(refined, g), name
        if anchor_step == "explicit":
            assert torch.equal(returned, g), name


@pytest.mark.parametrize("form", ["anchor", "squared_grad", "upstream"])
def test_every_form_at_lambda_zero_is_no_regularizer(form):
    """The lambda sweep runs lambda = 0 once, as `none`, for every form: each hook form at lambda = 0 must
    score and apply exactly the plain gradient, also where W != W0 and G is large."""
    model = make_tiny_llama(seed=5)
    named = dict(model.named_parameters())
    general = random_general(model, scale=1e6)
    anchors = {n: named[n].detach().clone() + 0.01 for n in general} if form == "anchor" else None
    callback = DualImportance(ImportanceSettings(form, 0.0), named, general, anchors)
    gen = torch.Generator().manual_seed(1)
    for name in general:
        g = torch.randn(named[name].shape, generator=gen)
        refined = g.clone()
        returned = callback(name, named[name], refined, context(step=3))
        assert torch.equal(refined, g) and torch.equal(returned, g), name


def test_proximal_anchor_step_solves_the_implicit_equation():
    """W' = W - eta (grad L(W) + 2 lambda G (W' - W0)): the implicit step, checked with autograd's
    gradient of the plain loss; it stays finite where the explicit step would overshoot (eta*lambda*G > 1)."""
    model = make_tiny_llama(seed=8)
    named = dict(model.named_parameters())
    general = random_general(model, scale=2.0 / (0.05 * LAM))  # G up to 2/(eta lambda): explicit SGD diverges there
    anchors = {n: named[n].detach().clone() + 0.01 for n in general}  # W != W0, so the term is active
    start = copy.deepcopy(model)
    lomo = Lomo(named.items(), lr=0.05, grad_callback=DualImportance(ImportanceSettings("anchor", LAM), named,
                                                                      general, anchors))
    batch = batches()[0]
    model.train(), start.train()
    lomo.update_pass(model(**batch).loss, 0.05)
    start_params = dict(start.named_parameters())
    grads = dict(zip(start_params, torch.autograd.grad(start(**batch).loss, list(start_params.values()))))
    for name in general:
        w_old, w_new = start_params[name].detach(), named[name].detach()
        residual = w_new - w_old + 0.05 * (grads[name] + 2 * LAM * general[name] * (w_new - anchors[name]))
        assert residual.abs().max() < 1e-5, name


def test_grad_penalty_gradient_is_the_hessian_vector_product_formula():
    """The hooks receive d/dW [L + lambda eta^2 sum G g^2] = g + 2 lambda eta^2 H (G g); the reference
    builds H v with torch.autograd.functional.hvp over a functional copy of the model, in float64."""
    from torch.func import functional_call

    model = make_tiny_llama(seed=9, num_hidden_layers=1).double().train()
    model.set_attn_implementation(DOUBLE_BACKWARD_ATTENTION)
    named = dict(model.named_parameters())
    general = {n: g.double() for n, g in random_general(model, scale=1e4).items()}
    callback = DualImportance(ImportanceSettings("grad_penalty", LAM), named, general)
    batch, eta = batches()[1], 0.05
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss_of(values: dict[str, torch.Tensor]) -> torch.Tensor:  # the model's own loss upcasts to fp32
        logits = functional_call(model, values, kwargs=inputs).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    loss = loss_of(named)
    got = torch.autograd.grad(loss + callback.gradient_penalty(loss, eta, named), list(named.values()))
    names, values = list(named), tuple(p.detach() for p in named.values())
    plain = torch.autograd.grad(loss_of(named), list(named.values()))
    direction = tuple(general[n] * g if n in general else torch.zeros_like(g) for n, g in zip(names, plain))
    _, hv = torch.autograd.functional.hvp(lambda *v: loss_of(dict(zip(names, v))), values, direction)
    for name, ours, g, h in zip(names, got, plain, hv):
        expected = g + 2 * LAM * eta ** 2 * h
        # norm-wise: LLaMA's RMSNorm computes in fp32 even in a float64 model
        assert (ours - expected).norm() <= 1e-5 * expected.norm(), (name, float((ours - expected).norm() / expected.norm()))
    share = sum(float((2 * LAM * eta ** 2 * h).norm()) for h in hv) / sum(float(g.norm()) for g in plain)
    assert share > 1e-3  # the Hessian-vector product is a real part of the gradient


def test_grad_penalty_through_lomo_equals_autograd_of_the_penalized_loss():
    model = make_tiny_llama(seed=10).train()
    model.set_attn_implementation(DOUBLE_BACKWARD_ATTENTION)
    reference = copy.deepcopy(model)
    named = dict(model.named_parameters())
    general = random_general(model, scale=100.0)
    callback = DualImportance(ImportanceSettings("grad_penalty", LAM), named, general)
    lomo = Lomo(named.items(), lr=0.05, grad_callback=callback)
    batch = batches()[2]
    loss = model(**batch).loss
    lomo.update_pass(loss + callback.gradient_penalty(loss, 0.05, named), 0.05)
    ref_named = dict(reference.named_parameters())
    ref_loss = reference(**batch).loss
    grads = torch.autograd.grad(ref_loss, list(ref_named.values()), create_graph=True)
    penalty = LAM * 0.05 ** 2 * sum((general[n] * g ** 2).sum() for n, g in zip(ref_named, grads) if n in general)
    total = torch.autograd.grad(ref_loss + penalty, list(ref_named.values()))
    for (name, p), g in zip(ref_named.items(), total):
        torch.testing.assert_close(named[name].detach(), (p - 0.05 * g).detach(), rtol=0, atol=1e-6, msg=name)


class _SaliencyProbe(SparseGPT):
    """SparseGPT that keeps the stage-1 saliency G of decoder layer 0."""

    def __init__(self) -> None:
        super().__init__(0.5)
        self.layer0: dict[str, torch.Tensor] = {}

    def prune(self, layer, module_name, weight, stats):
        outcome = super().prune(layer, module_name, weight, stats)
        if layer == 0:
            self.layer0[module_name] = outcome.scores
        return outcome


def test_normalised_G_makes_lambda_independent_of_seqlen():
    """The same tokens as 4 windows of 64 or 8 windows of 32: layer 0's attention inputs are identical
    (before any position mixing), raw G differs by the factor n_seq / tokens, normalised G does not,
    so the anchor term 2 lambda G (W - W0) is the same at both seqlens."""
    tokens = torch.randint(3, 900, (4 * 64,), generator=torch.Generator().manual_seed(2))
    probes = {}
    for seqlen in (64, 32):
        probe = _SaliencyProbe()
        prune_layerwise(make_tiny_llama(seed=11, num_hidden_layers=1), probe,
                        {"c4": tokens.reshape(-1, seqlen)}, batch_size=8, progress=False)
        probes[seqlen] = probe.layer0
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        long_g, short_g = probes[64][module], probes[32][module]
        drift = torch.randn(long_g.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(long_g, 2 * short_g, rtol=1e-3, atol=0)  # raw G scales with seqlen
        long_term = 2 * LAM * normalize_general(long_g, "matrix_mean") * drift
        short_term = 2 * LAM * normalize_general(short_g, "matrix_mean") * drift
        torch.testing.assert_close(long_term, short_term, rtol=1e-3, atol=1e-7)


def test_old_paper_name_is_refused_with_its_new_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("regularizer: paper\nregularizer_lambda: 0.1\n")
    with pytest.raises(DPrunerError, match="renamed 'squared_grad'"):
        load_config(config, ["general_importance_dir=" + str(tmp_path)])


def test_upstream_keeps_raw_G_and_refuses_normalisation(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"regularizer: upstream\ngeneral_importance_dir: {tmp_path}\n")
    assert load_config(config).general_importance_norm == "auto"
    with pytest.raises(DPrunerError, match="uses raw G"):
        load_config(config, ["general_importance_norm=matrix_mean"])


def test_projection_targets_cover_every_projection():
    model = make_tiny_llama(seed=0)
    assert sum(projection_target(n) is not None for n, _ in model.named_parameters()) == 7 * 3

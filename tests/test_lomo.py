"""LOMO and the dual importance against plain PyTorch and brute-force formulas on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_llama
from dpruner.importance import DualImportance, ImportanceSettings, projection_target
from dpruner.errors import DPrunerError
from dpruner.lomo import Lomo
from dpruner.loss import causal_lm_loss, check_chunked_loss
from dpruner.trainer import collate, lr_at

STEPS = 4
PEAK_LR = 0.05


def batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(6, 14, (3,), generator=gen).tolist()
        out.append(collate([torch.randint(3, 900, (n,), generator=gen).tolist() for n in lengths], pad_id=2))
    return out


def schedule(step: int) -> float:
    return lr_at(step, STEPS, PEAK_LR, 0.25, "linear")


def run_lomo(model, clip: float | None, callback=None, checkpointing: bool = False,
             loss_chunk: int | None = None) -> Lomo:
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    lomo = Lomo(model.named_parameters(), lr=PEAK_LR, clip_grad_norm=clip, grad_callback=callback)
    for step, batch in enumerate(batches(), start=1):
        if clip:
            lomo.norm_pass(causal_lm_loss(model, batch, loss_chunk), schedule(step))
        lomo.update_pass(causal_lm_loss(model, batch, loss_chunk), schedule(step))
    return lomo


def run_sgd(model, clip: float | None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=PEAK_LR)
    model.train()
    for step, batch in enumerate(batches(), start=1):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def assert_same_weights(a, b, atol: float = 1e-6) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("clip", [None, 1.0, 0.05])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lomo_equals_plain_sgd(clip, checkpointing):
    lomo_model = make_tiny_llama(seed=1)
    sgd_model = copy.deepcopy(lomo_model)
    start = copy.deepcopy(lomo_model)
    run_lomo(lomo_model, clip, checkpointing=checkpointing)
    run_sgd(sgd_model, clip)
    assert_same_weights(lomo_model, sgd_model)
    moved = max((p - q).abs().max().item() for p, q in zip(lomo_model.parameters(), start.parameters()))
    assert moved > 1e-4  # the comparison is not vacuous


@pytest.mark.parametrize("tied", [True, False])
def test_lomo_with_chunked_loss_equals_plain_sgd(tied):
    """The LM head's gradient arrives in one accumulation even when its logits are made in chunks."""
    lomo_model = make_tiny_llama(seed=1, tie_word_embeddings=tied)
    sgd_model = copy.deepcopy(lomo_model)
    run_lomo(lomo_model, 1.0, checkpointing=True, loss_chunk=5)
    run_sgd(sgd_model, 1.0)
    assert_same_weights(lomo_model, sgd_model, atol=2e-6)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_loss_and_gradients_equal_the_models_own(chunk):
    model = make_tiny_llama(seed=4).train()
    batch = batches()[0]
    assert (batch["labels"] == -100).any()  # padding is part of the check
    reference = model(**batch).loss
    expected = torch.autograd.grad(reference, list(model.parameters()))
    ours = causal_lm_loss(model, batch, chunk)
    got = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    for g, e in zip(got, expected):  # per-element tolerances would fail on fp32 summation order alone
        assert e.norm() > 0 and (g - e).norm() <= 1e-5 * e.norm()


def test_chunked_loss_refuses_a_model_whose_loss_differs():
    model = make_tiny_llama(seed=4)
    forward = model.forward

    def capped(**batch):
        out = forward(**batch)
        out.loss = out.loss * 0.5  # stands in for soft-capping or logit scaling inside the model
        return out

    model.forward = capped
    with pytest.raises(DPrunerError, match="loss_chunk_tokens=16: chunked loss"):
        check_chunked_loss(model, batches()[0], 16)
    check_chunked_loss(model, batches()[0], None)  # the model's own loss needs no check


def test_lomo_frees_every_gradient():
    model = make_tiny_llama(seed=2)
    run_lomo(model, 1.0)
    assert all(p.grad is None for p in model.parameters())


def random_general(model, scale: float, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) * scale for n, p in model.named_parameters() if projection_target(n)}


def reference_run(model, general, settings: ImportanceSettings, clip: float, loss_scale: float = 1.0,
                  anchors: dict[str, torch.Tensor] | None = None):
    """Brute force: autograd gradients of the loss (plus lambda sum G (W - W0)^2 for the anchor form),
    the per-weight formulas applied outside any hook, plain SGD. Returns the accumulated importance."""
    model.train()
    importance = {n: torch.zeros_like(g) for n, g in general.items()}
    lam = settings.regularizer_lambda
    prev_lr, prev_updated = PEAK_LR, False
    for step, batch in enumerate(batches(), start=1):
        lr = schedule(step)
        model.zero_grad(set_to_none=True)
        params = dict(model.named_parameters())
        loss = model(**batch).loss
        if anchors is not None:
            loss = loss + lam * sum((general[n] * (params[n] - anchors[n]) ** 2).sum() for n in general)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}

        def refined(eta: float) -> dict[str, torch.Tensor]:
            out = {}
            for name, g in grads.items():
                if name in general and settings.regularizer == "squared_grad":
                    g = g + 2 * lam * eta ** 2 * general[name] * g ** 2
                elif name in general and settings.regularizer == "upstream":
                    g = g + 2 * lam * eta ** 2 * general[name] * (loss_scale * g) ** 2 / (1000 * loss_scale)
                out[name] = g
            return out

        norm_grads = refined(prev_lr if settings.regularizer == "upstream" else lr)
        update_grads = refined(lr)
        total = torch.sqrt(sum((g ** 2).sum() for g in norm_grads.values()))
        coef = min(1.0, clip / (float(total) + 1e-6))
        accumulate_from = norm_grads if settings.accumulate == "upstream" else update_grads
        if settings.accumulate == "every_step" or prev_updated:
            for name in general:
                w = params[name].detach()
                gw = accumulate_from[name] * w
                if settings.formula == "upstream":
                    gw = gw * loss_scale
                    importance[name] += (gw + gw ** 2 / 2000 + w ** 3).abs()
                else:
                    importance[name] += (gw + 0.5 * gw ** 2).abs()
        with torch.no_grad():
            for name, p in params.items():
                p -= lr * coef * update_grads[name]
        prev_lr, prev_updated = lr, True
    return importance


FORMS = {
    "squared_grad": ImportanceSettings("squared_grad", 0.1, "paper", "every_step"),
    "upstream": ImportanceSettings("upstream", 0.1, "upstream", "upstream"),
    "anchor": ImportanceSettings("anchor", 0.1, "paper", "every_step", anchor_step="explicit"),
}


@pytest.mark.parametrize("form,pin", [*((f, False) for f in sorted(FORMS)), ("anchor", True)])
def test_dual_importance_matches_brute_force(form, pin):
    """pin: the `importance_offload: cpu` storage (pinned where CUDA exists, a no-op here)."""
    settings = FORMS[form]
    loss_scale = 65536.0 if form == "upstream" else 1.0
    model = make_tiny_llama(seed=4)
    reference_model = copy.deepcopy(model)
    general = random_general(model, scale=1.0 if form == "anchor" else 2e4)
    named = dict(model.named_parameters())
    anchors = {n: named[n].detach().clone() for n in general} if form == "anchor" else None
    callback = DualImportance(settings, named, general, anchors, pin=pin)
    lomo = Lomo(named.items(), lr=PEAK_LR, clip_grad_norm=1.0, emulated_loss_scale=loss_scale, grad_callback=callback)
    model.train()
    for step, batch in enumerate(batches(), start=1):
        lomo.norm_pass(model(**batch).loss, schedule(step))
        lomo.update_pass(model(**batch).loss, schedule(step))
    expected = reference_run(reference_model, general, settings, clip=1.0, loss_scale=loss_scale, anchors=anchors)
    assert sorted(callback.steps_accumulated) == (list(range(2, STEPS + 1)) if form == "upstream" else list(range(1, STEPS + 1)))
    for name, value in expected.items():
        torch.testing.assert_close(callback.scores[name], value, rtol=1e-4, atol=1e-10, msg=name)
    assert_same_weights(model, reference_model, atol=1e-6)


def test_regularizer_changes_the_run_and_lambda_zero_is_plain_lomo():
    base = make_tiny_llama(seed=5)
    plain, zero, regularized = (copy.deepcopy(base) for _ in range(3))
    run_lomo(plain, 1.0)
    general = random_general(base, scale=2e4)
    for model, lam in ((zero, 0.0), (regularized, 0.1)):
        named = dict(model.named_parameters())
        run_lomo(model, 1.0, callback=DualImportance(ImportanceSettings("squared_grad", lam), named, general))
    assert_same_weights(zero, plain, atol=0)
    differs = max((p - q).abs().max().item() for p, q in zip(regularized.parameters(), plain.parameters()))
    assert differs > 1e-6


def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale():
    """The original's dynamic loss scaling: an overflow found in the norm pass skips the step (no
    update, no importance), halves the scale, and the next step does not count as `after an update`."""
    from dpruner.lomo import DynamicLossScaler

    model = make_tiny_llama(seed=6)
    before = copy.deepcopy(model)
    scaler = DynamicLossScaler(65536.0)
    lomo = Lomo(model.named_parameters(), lr=PEAK_LR, clip_grad_norm=1.0, loss_scaler=scaler)
    batch = batches()[0]
    assert lomo.norm_pass(model(**batch).loss * float("inf"), PEAK_LR) is False
    assert scaler.scale == 32768.0 and lomo.previous_step_updated is False
    assert all(p.grad is None for p in model.parameters())
    assert_same_weights(model, before, atol=0)
    assert lomo.norm_pass(model(**batch).loss, PEAK_LR) is True
    lomo.update_pass(model(**batch).loss, PEAK_LR)
    assert lomo.previous_step_updated is True and scaler.scale == 32768.0


def test_loss_scaled_updates_equal_plain_sgd():
    from dpruner.lomo import DynamicLossScaler

    lomo_model = make_tiny_llama(seed=7)
    sgd_model = copy.deepcopy(lomo_model)
    lomo = Lomo(lomo_model.named_parameters(), lr=PEAK_LR, clip_grad_norm=1.0, loss_scaler=DynamicLossScaler(1024.0))
    lomo_model.train()
    for step, batch in enumerate(batches(), start=1):
        assert lomo.norm_pass(lomo_model(**batch).loss, schedule(step))
        lomo.update_pass(lomo_model(**batch).loss, schedule(step))
    run_sgd(sgd_model, 1.0)
    assert_same_weights(lomo_model, sgd_model)

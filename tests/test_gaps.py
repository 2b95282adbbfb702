"""Tests for code paths that planted bugs once slipped past: the LOMO update of bf16 parameters, the
warmup of the learning-rate schedule, which model the lambda sweep masks, an atomic write that fails
halfway, SparseGPT / MixCal under N:M against brute force, and MixCal with calibration sets of
unequal sizes. Each compares with an independent reference (torch.optim.SGD, autograd, direct
inverses), never with the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.io import atomic_dir, atomic_path, check_finite_scores, save_tensors, write_json
from dpruner.layerwise import LayerInputs, collect_stats
from dpruner.lomo import Lomo
from dpruner.masks import lowest_k
from dpruner.methods import get_method
from dpruner.obs import obs_prune
from dpruner.sweep import SweepConfig
from dpruner.trainer import lr_at
from reliability import debris
from test_obs import correlated_inputs


# --- LOMO on bf16 parameters against torch.optim.SGD on fp32 master copies ------------------------------

def _tiny_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _loss(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (net(x).float() ** 2).mean()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_lomo_bf16_update_equals_sgd_on_fp32_masters_rounded_to_bf16(clip):
    """The bf16 branch updates in fp32 and rounds once: W <- bf16(W - lr * clip_coef * g)."""
    lr = 0.5
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    net = _tiny_net(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}

    reference = _tiny_net(torch.bfloat16)
    _loss(reference, x).backward()
    masters = {n: p.detach().float().clone().requires_grad_() for n, p in reference.named_parameters()}
    for name, param in reference.named_parameters():
        masters[name].grad = param.grad.float()
    if clip is not None:
        total = torch.nn.utils.clip_grad_norm_(list(masters.values()), clip)
        assert total > clip  # clipping is active
    torch.optim.SGD(list(masters.values()), lr=lr).step()

    lomo = Lomo(net.named_parameters(), lr=lr, clip_grad_norm=clip)
    if clip is not None:
        assert lomo.norm_pass(_loss(net, x), lr)
    lomo.update_pass(_loss(net, x), lr)
    for name, param in net.named_parameters():
        assert param.dtype == torch.bfloat16
        expected = masters[name].detach().to(torch.bfloat16)
        assert not torch.equal(param.detach(), before[name]), f"{name} was not updated"
        # one bf16 ulp of slack for the order of fp32 operations before the single rounding
        torch.testing.assert_close(param.detach().float(), expected.float(), rtol=2 ** -7, atol=1e-6, msg=name)


# --- the learning-rate schedule, warmup included ---------------------------------------------------------

def test_lr_schedule_warms_up_linearly_then_decays_to_zero():
    total, warmup, peak = 20, 0.25, 0.03
    warm_steps = int(total * warmup)
    for step in range(1, warm_steps):  # strictly inside warmup: a straight line from 0 to the peak
        assert lr_at(step, total, peak, warmup, "linear") == pytest.approx(peak * step / warm_steps)
    for step in range(warm_steps, total + 1):  # then a straight line from the peak to 0 at the last step
        assert lr_at(step, total, peak, warmup, "linear") == pytest.approx(peak * (total - step) / (total - warm_steps))
    assert lr_at(3, total, peak, warmup, "constant") == peak
    assert lr_at(1, total, peak, 0.0, "linear") == pytest.approx(peak * (total - 1) / total)


# --- the lambda sweep masks the base model ---------------------------------------------------------------

def test_lambda_sweep_masks_the_base_model_with_its_own_importance(tmp_path):
    config = SweepConfig(kind="lambda", model="base-model", domain="legal", out=tmp_path, sparsities=[0.5],
                         lambdas=[0.1], general_importance=tmp_path / "gi")
    point = config.points()[1]
    command = config.prune_command(point, tmp_path / "pruned")
    assert Path(command[1]).name == "save_model.py"
    model, importance, target = command[2:5]
    assert model == "base-model"  # the ORIGINAL weights, never a stage-2 checkpoint
    assert Path(importance) == config.stage2_dir(point.stage2) / "importance"
    assert target == str(tmp_path / "pruned")


# --- atomic writes that fail halfway ----------------------------------------------------------------------

class Halfway(RuntimeError):
    pass


def test_atomic_file_write_failing_halfway_keeps_the_old_content(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"old": True})
    old = target.read_bytes()
    with pytest.raises(Halfway):
        with atomic_path(target) as tmp:
            tmp.write_text('{"new": tru')  # half of the new content is on disk
            raise Halfway
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_tensor_save_failing_inside_the_library_keeps_the_old_file(tmp_path, monkeypatch):
    import dpruner.io

    target = tmp_path / "layer_000.safetensors"
    save_tensors(target, {"w": torch.ones(3)})
    old = target.read_bytes()

    def half_written(tensors, path):
        Path(path).write_bytes(b"\x10\x00\x00\x00partial")
        raise Halfway

    monkeypatch.setattr(dpruner.io, "save_file", half_written)
    with pytest.raises(Halfway):
        save_tensors(target, {"w": torch.zeros(3)})
    assert target.read_bytes() == old and debris(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_folder_write_failing_halfway_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"old": 1}))
    with pytest.raises(Halfway):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise Halfway
    assert json.loads((target / "config.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- SparseGPT / MixCal under N:M against brute-force OBS --------------------------------------------------

def brute_force_obs_n_m(W: torch.Tensor, H: torch.Tensor, n: int, m: int, percdamp: float):
    """Textbook OBS one column at a time with direct inverses; at the first column of every group of M,
    the N inputs of lowest saliency w^2/[H_F^-1]_jj of each row (on the current, compensated W) are chosen."""
    W = W.double().clone()
    H = H.double().clone()
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    rows, cols = W.shape
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            inv_diag = torch.tensor([torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, j + m)], dtype=torch.float64)
            mask[:, j:j + m] = lowest_k(W[:, j:j + m] ** 2 / inv_diag, n)
        Hinv = torch.linalg.inv(H[j:, j:])
        pruned = mask[:, j]
        err = W[pruned, j] / Hinv[0, 0]
        W[pruned, j:] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
        W[pruned, j] = 0
    return W, mask


def _check_against_brute_force(result_weight, result_mask, W, H, n, m):
    ref_W, ref_mask = brute_force_obs_n_m(W, H, n, m, 0.01)
    assert torch.equal(result_mask, ref_mask)  # which weights are pruned
    torch.testing.assert_close(result_weight.double(), ref_W, rtol=2e-4, atol=2e-5)  # and the compensation
    assert torch.all(result_weight[result_mask] == 0)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 8), (4, 8, 16), (2, 4, 24)])
def test_obs_n_m_matches_brute_force(n, m, blocksize):
    W = torch.randn(6, 24, generator=torch.Generator().manual_seed(n * m))
    X = correlated_inputs(64, 24, seed=m)
    H = (2 / 64) * X.T @ X
    result = obs_prune(W, H.float(), n / m, blocksize=blocksize, percdamp=0.01, n_m=(n, m))
    _check_against_brute_force(result.weight, result.mask, W, H, n, m)


class _OneLinear(nn.Module):
    def __init__(self, cols: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cols, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _stats(layer: nn.Module, sequences: torch.Tensor):
    return collect_stats(layer, ["proj"], LayerInputs([sequences], [{}]), with_hessian=True)["proj"]


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_mixcal_blends_each_set_normalised_by_its_own_count_and_prunes_n_m_as_brute_force(alpha):
    """Sets of 1 and 7 sequences: H = alpha * 2/1 X_g'X_g + (1 - alpha) * 2/7 X_d'X_d, never a blend
    normalised by the pooled count of 8; then the N:M OBS result on that H matches brute force."""
    cols, tokens = 16, 6
    layer = _OneLinear(cols)
    general = correlated_inputs(1 * tokens, cols, seed=3).float().reshape(1, tokens, cols)
    domain = (3 * correlated_inputs(7 * tokens, cols, seed=4)).float().reshape(7, tokens, cols)
    stats = {"general": _stats(layer, general), "domain": _stats(layer, domain)}
    xg, xd = general.reshape(-1, cols).double(), domain.reshape(-1, cols).double()
    expected = alpha * (2 / 1) * xg.T @ xg + (1 - alpha) * (2 / 7) * xd.T @ xd
    method = get_method("mixcal", sparsity=0.5, alpha=alpha, pattern="2:4", blocksize=8)
    torch.testing.assert_close(method.hessian(stats).double(), expected, rtol=1e-5, atol=1e-5)
    outcome = method.prune(0, "proj", layer.proj.weight.data, stats)
    _check_against_brute_force(outcome.weight, outcome.mask, layer.proj.weight.data, expected, 2, 4)


def test_non_finite_importance_is_never_published():
    layers = [{"mlp.up_proj": torch.ones(2, 3)}, {"mlp.up_proj": torch.tensor([[1.0, float("nan"), 2.0]])}]
    with pytest.raises(DPrunerError, match="layer 1 mlp.up_proj holds 1 NaN/inf"):
        check_finite_scores("importance", layers)
    check_finite_scores("importance", layers[:1])

"""The OBS solver against an independent brute-force reference (direct inverses, no Cholesky)."""

from __future__ import annotations

import pytest
import torch

from dpruner.masks import lowest_k
from dpruner.obs import obs_prune


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64) / cols ** 0.5 + torch.eye(cols, dtype=torch.float64)
    return torch.randn(n, cols, generator=gen, dtype=torch.float64) @ mix


def brute_force_obs(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int, percdamp: float,
                    given_mask: torch.Tensor | None = None, ranking: torch.Tensor | None = None, blend: float = 1.0):
    """Textbook OBS, one column at a time: the inverse Hessian of the columns still present is
    inverted directly; saliency w^2/[H_F^-1]_jj at each block start picks the block's mask (or
    saliency^(1 - blend) * ranking^blend does, or `given_mask` is used as it is)."""
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=torch.float64)
    rows, cols = W.shape
    saliency = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        inv_diag = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(b0, b1)], dtype=torch.float64)
        saliency[:, b0:b1] = W[:, b0:b1] ** 2 / inv_diag
        if given_mask is not None:
            mask[:, b0:b1] = given_mask[:, b0:b1]
        else:
            block = (saliency if ranking is None else saliency ** (1 - blend) * ranking.double() ** blend)
            block = block[:, b0:b1].reshape(1, -1)
            mask[:, b0:b1] = lowest_k(block, int(block.numel() * sparsity)).reshape(rows, b1 - b0)
        for j in range(b0, b1):
            Hinv = torch.linalg.inv(H[j:, j:])
            pruned = mask[:, j]
            err = W[pruned, j] / Hinv[0, 0]
            W[pruned, j:] -= err.unsqueeze(1) * Hinv[0].unsqueeze(0)
            W[pruned, j] = 0
    return W, saliency, mask


@pytest.mark.parametrize("rows,cols,blocksize,sparsity", [(6, 16, 8, 0.5), (5, 12, 5, 0.52), (8, 20, 20, 0.3)])
def test_obs_matches_brute_force(rows, cols, blocksize, sparsity):
    gen = torch.Generator().manual_seed(rows * cols)
    W = torch.randn(rows, cols, generator=gen)
    X = correlated_inputs(64, cols, seed=cols)
    H = (2 / 64) * X.T @ X
    result = obs_prune(W, H.float(), sparsity, blocksize=blocksize, percdamp=0.01)
    ref_W, ref_saliency, ref_mask = brute_force_obs(W, H, sparsity, blocksize, 0.01)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.saliency.double(), ref_saliency, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(result.weight.double(), ref_W, rtol=2e-4, atol=2e-5)
    assert torch.all(result.weight[result.mask] == 0)


def test_exact_sparsity_in_every_block():
    rows, cols, blocksize, sparsity = 7, 40, 16, 0.52
    W = torch.randn(rows, cols)
    X = correlated_inputs(50, cols, seed=1)
    result = obs_prune(W, ((2 / 50) * X.T @ X).float(), sparsity, blocksize=blocksize)
    for b0 in range(0, cols, blocksize):
        block = result.mask[:, b0:b0 + blocksize]
        assert int(block.sum()) == int(block.numel() * sparsity)


def test_n_m_pattern_prunes_n_of_every_m():
    W = torch.randn(6, 32)
    X = correlated_inputs(80, 32, seed=2)
    result = obs_prune(W, ((2 / 80) * X.T @ X).float(), 0.5, blocksize=16, n_m=(2, 4))
    groups = result.mask.reshape(6, 8, 4).sum(dim=-1)
    assert torch.all(groups == 2)


def test_obs_reconstruction_beats_magnitude():
    """With LLM-like inputs (a few strong shared directions plus noise) the compensated weights
    reconstruct W X far better than magnitude pruning at the same sparsity."""
    rows, cols, n, sparsity = 32, 64, 512, 0.5
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(n, 8, generator=gen) @ (3 * torch.randn(8, cols, generator=gen)) + torch.randn(n, cols, generator=gen)
    obs = obs_prune(W, (2 / n) * X.T @ X, sparsity, blocksize=64)
    magnitude = W.clone()
    magnitude.view(-1)[torch.argsort(W.abs().flatten(), stable=True)[: int(W.numel() * sparsity)]] = 0
    err_obs = torch.linalg.norm(X @ W.T - X @ obs.weight.T)
    err_mag = torch.linalg.norm(X @ W.T - X @ magnitude.T)
    assert err_obs < 0.5 * err_mag, (err_obs, err_mag)


def test_dead_input_columns_are_zeroed_without_nan():
    W = torch.randn(4, 8)
    X = correlated_inputs(30, 8, seed=4)
    X[:, 3] = 0
    result = obs_prune(W, ((2 / 30) * X.T @ X).float(), 0.5, blocksize=8)
    assert torch.all(result.weight[:, 3] == 0)
    assert torch.isfinite(result.saliency).all() and torch.isfinite(result.weight).all()


def _problem(rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen)
    X = correlated_inputs(64, cols, seed=seed + 1)
    return W, (2 / 64) * X.T @ X, gen, X.float()


@pytest.mark.parametrize("rows,cols,blocksize", [(6, 16, 8), (5, 12, 5)])
def test_fixed_mask_compensation_matches_brute_force(rows, cols, blocksize):
    """D-Pruner-OBS's first form: a mask chosen elsewhere is kept exactly, only the updates run."""
    W, H, gen, X = _problem(rows, cols, seed=rows + cols)
    given = torch.rand(rows, cols, generator=gen) < 0.5
    result = obs_prune(W, H.float(), 0.5, blocksize=blocksize, percdamp=0.01, fixed_mask=given)
    ref_W, _, ref_mask = brute_force_obs(W, H, 0.5, blocksize, 0.01, given_mask=given)
    assert torch.equal(result.mask, given) and torch.equal(ref_mask, given)
    torch.testing.assert_close(result.weight.double(), ref_W, rtol=2e-4, atol=2e-5)
    # Compensation helps: on the calibration inputs the error is below plain masking with the same mask.
    masked = W.masked_fill(given, 0)
    assert torch.linalg.norm(X @ (W - result.weight).T) < torch.linalg.norm(X @ (W - masked).T)


def test_external_ranking_inside_the_sweep_matches_brute_force():
    """D-Pruner-OBS's second form: another score ranks each block, the OBS sweep is otherwise SparseGPT's."""
    W, H, gen, _ = _problem(6, 16, seed=11)
    ranking = torch.rand(6, 16, generator=gen)
    result = obs_prune(W, H.float(), 0.5, blocksize=8, percdamp=0.01, selection_scores=ranking)
    ref_W, ref_saliency, ref_mask = brute_force_obs(W, H, 0.5, 8, 0.01, ranking=ranking)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight.double(), ref_W, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(result.saliency.double(), ref_saliency, rtol=2e-4, atol=1e-6)
    for b0 in (0, 8):
        assert int(result.mask[:, b0:b0 + 8].sum()) == 24


def test_blended_ranking_inside_the_sweep_matches_brute_force():
    """The `blend` selection: saliency^(1 - b) * S^b ranks each block (brute force: the plain product in
    float64), and its two ends are SparseGPT's own sweep and the external ranking alone, bit for bit."""
    W, H, gen, _ = _problem(6, 16, seed=13)
    ranking = torch.rand(6, 16, generator=gen)
    result = obs_prune(W, H.float(), 0.5, blocksize=8, percdamp=0.01, selection_scores=ranking, blend=0.3)
    ref_W, _, ref_mask = brute_force_obs(W, H, 0.5, 8, 0.01, ranking=ranking, blend=0.3)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight.double(), ref_W, rtol=2e-4, atol=2e-5)
    plain = obs_prune(W, H.float(), 0.5, blocksize=8, percdamp=0.01)
    external = obs_prune(W, H.float(), 0.5, blocksize=8, percdamp=0.01, selection_scores=ranking)
    for blend, expected in ((0.0, plain), (1.0, external)):
        end = obs_prune(W, H.float(), 0.5, blocksize=8, percdamp=0.01, selection_scores=ranking, blend=blend)
        assert torch.equal(end.mask, expected.mask) and torch.equal(end.weight, expected.weight), blend
    assert not torch.equal(result.mask, plain.mask) and not torch.equal(result.mask, external.mask)
    with pytest.raises(ValueError, match="blend must be in"):
        obs_prune(W, H.float(), 0.5, selection_scores=ranking, blend=float("nan"))


def test_obs_refuses_two_selections_and_wrong_shapes():
    W, H, _, _ = _problem(4, 8, seed=3)
    with pytest.raises(ValueError, match="not both"):
        obs_prune(W, H.float(), 0.5, fixed_mask=W > 0, selection_scores=W.abs())
    with pytest.raises(ValueError, match="shape"):
        obs_prune(W, H.float(), 0.5, fixed_mask=torch.zeros(3, 8, dtype=torch.bool))

"""The SparseGPT / OBS solver for one linear layer: scores, mask and compensated weights.

Given W [rows=out, cols=in] and H = 2/n sum x x^T of its inputs, sweep the columns in blocks. At each
block start the saliency w^2 / U_jj^2 (U the upper Cholesky factor of H^-1, so U_jj^2 is the inverse
Hessian diagonal of the columns still present) picks the weights to prune; each pruned weight's error
is pushed onto the remaining columns (OBS update), lazily for later blocks. Stage 1 of D-Pruner stores
the saliency as the general importance; the SparseGPT baseline and MixCal keep the pruned weights.

Two hooks serve D-Pruner-OBS: `fixed_mask` keeps a mask chosen elsewhere (the dual-importance mask) and
only runs the compensation; `selection_scores` S joins the ranking inside each block of the sweep, as
the weighted geometric mean saliency^(1 - blend) * S^blend: blend = 1 ranks by S alone, blend = 0 is
SparseGPT's own ranking (the rest of the sweep, including the saliency that is returned, is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpruner.masks import lowest_k

# SparseGPT defaults, also used by the original general.py.
DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01


@dataclass
class ObsResult:
    weight: torch.Tensor  # pruned + compensated, fp32
    saliency: torch.Tensor  # fp32, weight shape: w_cur^2 / U_jj^2 at the start of each block
    mask: torch.Tensor  # bool, True = pruned
    loss: float  # sum of OBS losses 1/2 (w - q)^2 / U_jj^2


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1. Zeroes `weight` columns whose input never fires."""
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    weight[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def blended_ranking(saliency: torch.Tensor, scores: torch.Tensor | None, blend: float) -> torch.Tensor:
    """saliency^(1 - blend) * scores^blend as a ranking (lower = pruned first). In float64 logs, so it
    neither underflows nor merges fp32 values that differ; the two ends are the inputs themselves."""
    if scores is None or blend == 0.0:
        return saliency
    if blend == 1.0:
        return scores.float()
    return (1.0 - blend) * saliency.double().log() + blend * scores.double().log()


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
              blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP,
              n_m: tuple[int, int] | None = None, fixed_mask: torch.Tensor | None = None,
              selection_scores: torch.Tensor | None = None, blend: float = 1.0) -> ObsResult:
    """Prune `sparsity` of every rows x block (or N of every M columns per row) with OBS updates.

    `fixed_mask` (bool, True = pruned) overrides the selection entirely; `selection_scores` (weight
    shape, >= 0) rank within each block or N:M group, blended with the OBS saliency by `blend` in [0, 1]
    (`blended_ranking`).
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    W = weight.detach().float().clone()
    rows, cols = W.shape
    for name, given in (("fixed_mask", fixed_mask), ("selection_scores", selection_scores)):
        if given is not None and tuple(given.shape) != (rows, cols):
            raise ValueError(f"{name} has shape {list(given.shape)}, the weight is {[rows, cols]}")
    if fixed_mask is not None and selection_scores is not None:
        raise ValueError("give fixed_mask or selection_scores, not both")
    U = inverse_hessian_factor(hessian, W, percdamp)
    saliency = torch.empty_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    total_loss = 0.0
    if n_m is not None and blocksize % n_m[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={n_m[1]}")
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        diag = torch.diag(U1)
        block_saliency = W1 ** 2 / diag ** 2
        saliency[:, i1:i2] = block_saliency
        block_scores = None if selection_scores is None else selection_scores[:, i1:i2]
        ranking = blended_ranking(block_saliency, block_scores, blend)
        if fixed_mask is not None:
            block_mask = fixed_mask[:, i1:i2].to(device=W.device, dtype=torch.bool)
        elif n_m is None:
            flat = ranking.reshape(1, -1)
            block_mask = lowest_k(flat, int(flat.numel() * sparsity)).reshape(W1.shape)
        else:
            block_mask = torch.zeros_like(W1, dtype=torch.bool)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        losses = torch.zeros(i2 - i1, device=W.device)
        for i in range(i2 - i1):
            if fixed_mask is None and n_m is not None and i % n_m[1] == 0:
                group = blended_ranking(W1[:, i:i + n_m[1]] ** 2 / diag[i:i + n_m[1]] ** 2,
                                        None if block_scores is None else block_scores[:, i:i + n_m[1]], blend)
                block_mask[:, i:i + n_m[1]] = lowest_k(group, n_m[0])
            w = W1[:, i]
            q = torch.where(block_mask[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / diag[i]
            losses[i] = (err * err).sum() / 2
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        total_loss += float(losses.sum())
        mask[:, i1:i2] = block_mask
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return ObsResult(weight=W, saliency=saliency, mask=mask, loss=total_loss)

"""Mask selectors against a brute-force reference: sort (score, flat index) pairs per group in pure
Python, prune the first int(group size * sparsity). Scores are small integers (many ties, signed
zeros included), so the tie-breaking rule is what is being tested."""

from __future__ import annotations

import pytest
import torch

from dpruner.errors import DPrunerError
from dpruner.masks import column_block_mask, matrix_mask, n_m_mask, parse_pattern, row_mask, select

SPARSITIES = (0.0, 0.25, 0.3, 0.5, 0.52, 0.99)


def tied_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Values 0..3 (lots of ties) with about half of the zeros negative (-0.0 must tie with 0.0)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=generator).float()
    flip = torch.rand(rows, cols, generator=generator) < 0.5
    return torch.where(flip & (scores == 0), -scores, scores)


def reference(scores: torch.Tensor, groups: list[list[int]], pruned_per_group: int) -> torch.Tensor:
    """Per group: sort (score, flat index) and prune the first `pruned_per_group`."""
    values = scores.flatten().tolist()
    mask = [False] * len(values)
    for group in groups:
        for _, index in sorted((values[i], i) for i in group)[:pruned_per_group]:
            mask[index] = True
    return torch.tensor(mask).reshape(scores.shape)


def matrix_groups(rows: int, cols: int) -> list[list[int]]:
    return [list(range(rows * cols))]


def block_groups(rows: int, cols: int, blocks: int) -> list[list[int]]:
    width = cols // blocks
    return [[r * cols + c for r in range(rows) for c in range(b * width, (b + 1) * width)] for b in range(blocks)]


def row_groups(rows: int, cols: int) -> list[list[int]]:
    return [[r * cols + c for c in range(cols)] for r in range(rows)]


def n_m_groups(rows: int, cols: int, m: int) -> list[list[int]]:
    return [[r * cols + g * m + j for j in range(m)] for r in range(rows) for g in range(cols // m)]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(8, 12), (5, 24), (1, 7)])
def test_matrix_mask_matches_brute_force(shape, sparsity):
    scores = tied_scores(*shape, seed=1)
    expected = reference(scores, matrix_groups(*shape), int(scores.numel() * sparsity))
    mask = matrix_mask(scores, sparsity)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == int(scores.numel() * sparsity)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape,blocks", [((8, 12), 4), ((8, 12), 3), ((5, 24), 6), ((4, 16), 16), ((3, 10), 1)])
def test_column_block_mask_matches_brute_force(shape, blocks, sparsity):
    rows, cols = shape
    scores = tied_scores(rows, cols, seed=2)
    per_block = int(rows * (cols // blocks) * sparsity)
    mask = column_block_mask(scores, sparsity, blocks)
    assert torch.equal(mask, reference(scores, block_groups(rows, cols, blocks), per_block))
    for block in mask.reshape(rows, blocks, cols // blocks).transpose(0, 1):
        assert int(block.sum()) == per_block


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_row_mask_matches_brute_force(sparsity):
    scores = tied_scores(6, 20, seed=3)
    mask = row_mask(scores, sparsity)
    assert torch.equal(mask, reference(scores, row_groups(6, 20), int(20 * sparsity)))
    assert (mask.sum(dim=1) == int(20 * sparsity)).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_mask_prunes_exactly_n_of_every_m_inputs(n, m):
    scores = tied_scores(6, 32, seed=4)
    mask = n_m_mask(scores, n, m)
    assert torch.equal(mask, reference(scores, n_m_groups(6, 32, m), n))
    assert (mask.reshape(6, 32 // m, m).sum(dim=-1) == n).all()


def test_distinct_scores_prune_the_lowest():
    scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    k = int(scores.numel() * 0.52)
    threshold = scores.flatten().sort().values[k - 1]
    assert torch.equal(matrix_mask(scores, 0.52), scores <= threshold)


def test_select_dispatches_and_n_m_overrides_scope_and_sparsity():
    scores = tied_scores(8, 16, seed=6)
    assert torch.equal(select(scores, 0.5), matrix_mask(scores, 0.5))
    assert torch.equal(select(scores, 0.5, scope="block", blocks=4), column_block_mask(scores, 0.5, 4))
    assert torch.equal(select(scores, 0.5, scope="row"), row_mask(scores, 0.5))
    assert torch.equal(select(scores, 0.1, scope="block", blocks=3, pattern="2:4"), n_m_mask(scores, 2, 4))


@pytest.mark.parametrize("blocks", [3, 5, 0, -2])
def test_block_count_that_does_not_divide_the_columns_errors(blocks):
    with pytest.raises(DPrunerError, match=f"--blocks {blocks} does not divide the 16 input columns"):
        column_block_mask(torch.zeros(4, 16), 0.5, blocks)


def test_n_m_needs_a_multiple_of_m_columns():
    with pytest.raises(DPrunerError, match="multiple of 4"):
        n_m_mask(torch.zeros(4, 10), 2, 4)


@pytest.mark.parametrize("pattern", ["3:2", "2:2", "0:4", "two:four", "2:4:8", "50%"])
def test_bad_patterns_error(pattern):
    with pytest.raises(DPrunerError, match="pattern"):
        parse_pattern(pattern)


def test_unknown_scope_errors():
    with pytest.raises(DPrunerError, match="scope 'global'"):
        select(torch.zeros(2, 2), 0.5, scope="global")

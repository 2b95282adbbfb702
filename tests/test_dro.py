"""The DRO update (DRPruning's update_mw) against brute force, and its limits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dpruner.dro import DroSettings, DroState, LossEma, dro_update
from dpruner.errors import DPrunerError

EXACT = DroSettings(min_prob=0.0, clamp_to_min_proportion=False, tol=1e-12)  # the unclamped DRO problem


def simplex_grid(steps: int) -> np.ndarray:
    """Every 3-domain distribution with coordinates in multiples of 1/steps (all positive)."""
    points = [(a, b, steps - a - b) for a, b in itertools.product(range(1, steps), repeat=2) if a + b < steps]
    return np.asarray(points, dtype=np.float64) / steps


CASES = [  # (losses, reference, p)
    ([3.0, 2.5, 4.0], [2.8, 2.0, 3.1], [0.5, 0.3, 0.2]),
    ([2.0, 2.2, 2.1], [1.9, 1.9, 1.9], [1 / 3, 1 / 3, 1 / 3]),
    ([5.0, 1.0, 1.5], [1.0, 1.0, 1.0], [0.2, 0.4, 0.4]),
]


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("losses,reference,p", CASES)
def test_update_is_the_brute_force_maximiser_of_the_chi_square_ball(losses, reference, p, rho):
    """Unclamped, q maximises sum q*excess over {q : 1/2 sum p (q/p - 1)^2 <= rho}; a grid cannot beat it."""
    settings = DroSettings(rho=rho, min_prob=0.0, clamp_to_min_proportion=False, tol=1e-12)
    result = dro_update(losses, reference, p, settings)
    excess, p_arr, q = np.subtract(losses, reference), np.asarray(p), np.asarray(result.proportions)
    grid = simplex_grid(400)
    feasible = grid[0.5 * np.sum(p_arr * (grid / p_arr - 1) ** 2, axis=1) <= rho]
    best = feasible[np.argmax(feasible @ excess)]
    assert result.divergence == pytest.approx(rho, abs=1e-9)
    assert q @ excess >= best @ excess - 1e-12  # no feasible grid point does better
    assert q @ excess - best @ excess <= 2e-3 * np.ptp(excess)  # and the grid gets within its resolution


@pytest.mark.parametrize("losses,reference,p", CASES)
def test_clamped_update_matches_a_dense_scan_of_eta(losses, reference, p):
    """With DRPruning's clamps (q/p >= min_prob, q >= min p), the bisection finds the scanned eta."""
    settings = DroSettings()
    excess, p_arr = np.subtract(losses, reference), np.asarray(p)

    etas = np.linspace(-50 * excess.max(), excess.max(), 200_001)[:-1, None]
    weights = p_arr * np.clip(excess - etas, 0, None)
    ratio = np.clip(weights / weights.sum(axis=1, keepdims=True) / p_arr, settings.min_prob, None)
    q = ratio * p_arr / np.sum(ratio * p_arr, axis=1, keepdims=True)
    divergence = 0.5 * np.sum(p_arr * (q / p_arr - 1) ** 2, axis=1)
    expected = np.maximum(q[np.argmin(np.abs(divergence - settings.rho))], p_arr.min())
    expected /= expected.sum()
    np.testing.assert_allclose(dro_update(losses, reference, p, settings).proportions, expected, atol=2e-3)


def test_larger_excess_gains_weight():
    p = [0.25, 0.25, 0.25, 0.25]
    reference = [2.0] * 4
    result = dro_update([2.1, 2.1, 2.6, 2.1], reference, p)
    q = result.proportions
    assert q[2] > p[2] and all(q[i] < p[i] for i in (0, 1, 3))
    worse = dro_update([2.1, 2.1, 3.2, 2.1], reference, p, EXACT).proportions
    assert worse[2] >= dro_update([2.1, 2.1, 2.6, 2.1], reference, p, EXACT).proportions[2]


@pytest.mark.parametrize("settings", [EXACT, DroSettings()])
def test_rho_to_zero_keeps_p(settings):
    losses, reference, p = CASES[0]
    assert dro_update(losses, reference, p, DroSettings(rho=0.0)).proportions == p
    deviations = []
    for rho in (1e-2, 1e-4, 1e-6):
        q = np.asarray(dro_update(losses, reference, p, DroSettings(**{**settings.__dict__, "rho": rho})).proportions)
        deviations.append(np.abs(q - p).max())
        if settings is EXACT:  # 1/2 sum p (q/p - 1)^2 <= rho bounds every coordinate
            assert np.all(np.abs(q - p) <= np.sqrt(2 * (rho + settings.tol) * np.asarray(p)) + 1e-12)
    assert deviations == sorted(deviations, reverse=True)


def test_equal_excess_keeps_p_and_negative_excess_backs_off_the_reference():
    p = [0.5, 0.3, 0.2]
    assert dro_update([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], p).kept
    result = dro_update([1.0, 1.5, 1.2], [2.0, 2.0, 2.0], p)  # every loss under its reference
    assert result.reference_scale < 1 and not result.kept
    assert np.max(np.subtract([1.0, 1.5, 1.2], np.multiply([2.0] * 3, result.reference_scale))) >= 0


def test_ema_starts_at_the_first_loss_and_skips_non_finite_ones():
    ema = LossEma(2, ema=0.1)
    ema.observe(0, 2.0)
    ema.observe(0, math.inf)  # a skipped fp16 step
    ema.observe(0, 3.0)
    assert ema.values == [pytest.approx(0.9 * 2.0 + 0.1 * 3.0), None]


def test_state_waits_for_every_domain_and_smooths_the_centre():
    state = DroState([0.5, 0.5], [1.0, 1.0], DroSettings(), smoothing=0.1)
    assert state.update([2.0, None]) is None
    result = state.update([2.1, 1.5])
    assert result.proportions[0] > 0.5 and state.proportions.tolist() == result.proportions
    expected_centre = 0.9 * np.array([0.5, 0.5]) + 0.1 * np.asarray(result.proportions)
    np.testing.assert_allclose(state.centre, expected_centre / expected_centre.sum())
    restored = DroState([0.5, 0.5], [1.0, 1.0], DroSettings())
    restored.load_state_dict(state.state_dict())
    assert restored.state_dict() == state.state_dict()


@pytest.mark.parametrize("losses,p", [([math.nan, 1.0], [0.5, 0.5]), ([1.0, math.inf], [0.5, 0.5]),
                                      ([1.0, 2.0], [0.7, 0.7]), ([1.0], [0.5, 0.5])])
def test_bad_vectors_are_rejected(losses, p):
    with pytest.raises(DPrunerError, match="dro"):
        dro_update(losses, [1.0] * len(p), p)

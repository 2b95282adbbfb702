"""Distributionally robust domain weights, as DRPruning's `DRPruningCallback.update_mw` computes them.

Seed 003 (DRPruning, hexuandeng/DRPruning, drpruning/callbacks/DRO_loading_callback.py) reweights the
training domains so that no domain falls far behind its reference loss. With excess e = loss - reference
and the centre proportions p, the new proportions are

    q(eta) ∝ p * relu(e - eta),   the ratio q/p clamped below at `min_prob`, renormalised,

with eta chosen by bisection so that the chi-square divergence 1/2 sum p (q/p - 1)^2 equals rho. Without
the clamp this is the maximiser of sum q*e over the chi-square ball of radius rho (the DRO dual), which
the tests check against a brute-force search. Where no eta reaches rho, p is kept (as the callback does
when its bisection fails).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpruner.errors import DPrunerError

# DRPruningCallback.__init__ defaults (DRO_loading_callback.py).
DEFAULT_RHO = 0.05  # rho: radius of the chi-square ball around p
DEFAULT_EMA = 0.1  # ema (EMA_alpha): weight of the newest loss in the running per-domain loss
DEFAULT_MIN_PROB = 0.2  # min_prob: lower clamp of q/p
DEFAULT_CLAMP_TO_MIN_PROPORTION = True  # clamp_q_to_min=1: q is also kept >= min(p)
# DRPruningCallback.initialize: self.tol; bisection(..., max_iter=1000).
DEFAULT_TOL = 1e-4
DEFAULT_MAX_ITER = 1000
# update_mw: while every excess is negative the reference is scaled by 0.9, 0.8, ... (times * 0.1).
REFERENCE_BACKOFF = 0.1
# update_proportion (dynamic_proportion): p_train <- (1 - 0.1) p_train + 0.1 q.
DEFAULT_SMOOTHING = 0.1


@dataclass(frozen=True)
class DroSettings:
    rho: float = DEFAULT_RHO
    min_prob: float = DEFAULT_MIN_PROB
    clamp_to_min_proportion: bool = DEFAULT_CLAMP_TO_MIN_PROPORTION
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        checks = {"rho": self.rho >= 0, "min_prob": 0 <= self.min_prob <= 1, "tol": self.tol > 0,
                  "max_iter": self.max_iter >= 1}
        for key, ok in checks.items():
            value = getattr(self, key)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise DPrunerError(f"dro {key}={value} out of range")


@dataclass(frozen=True)
class DroUpdate:
    proportions: list[float]
    eta: float | None  # None where p was kept
    divergence: float  # 1/2 sum p (q/p - 1)^2 of the returned proportions
    reference_scale: float  # 1.0 unless every excess was negative (the callback's back-off)
    kept: bool


def chi_square(q: np.ndarray, p: np.ndarray) -> float:
    """1/2 sum p (q/p - 1)^2, the divergence DRPruning bounds by rho."""
    return float(0.5 * np.sum(p * (q / p - 1.0) ** 2))


def _check_vector(name: str, values: Sequence[float], size: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (size is not None and len(array) != size):
        raise DPrunerError(f"dro {name}: expected {size or 'a list of'} numbers, got {list(values)}")
    if not np.all(np.isfinite(array)):
        raise DPrunerError(f"dro {name}: {list(values)} contains NaN or inf")
    return array


def _tilted(p: np.ndarray, excess: np.ndarray, eta: float, settings: DroSettings) -> np.ndarray:
    """q(eta); at eta >= max(excess) the limit: all mass on the domains of largest excess."""
    weights = p * np.maximum(excess - eta, 0.0)
    if weights.sum() <= 0:
        weights = p * (excess == excess.max())
    ratio = np.maximum(weights / weights.sum() / p, settings.min_prob)
    q = ratio * p
    return q / q.sum()


def dro_update(losses: Sequence[float], reference: Sequence[float], p: Sequence[float],
               settings: DroSettings = DroSettings()) -> DroUpdate:
    """New proportions from per-domain losses, reference losses and centre proportions p."""
    p_arr = _check_vector("proportions", p)
    if np.any(p_arr <= 0) or not math.isclose(float(p_arr.sum()), 1.0, rel_tol=1e-6):
        raise DPrunerError(f"dro proportions {list(p)} must be positive and sum to 1")
    loss = _check_vector("losses", losses, len(p_arr))
    ref = _check_vector("reference losses", reference, len(p_arr))
    scale = 1.0
    while np.max(loss - ref * scale) < 0 and scale > 0:
        scale = round(scale - REFERENCE_BACKOFF, 10)
    excess = loss - ref * scale
    kept = DroUpdate(p_arr.tolist(), None, 0.0, scale, True)
    if settings.rho == 0 or np.ptp(excess) == 0:
        return kept

    def gap(eta: float) -> float:  # increasing in eta
        return chi_square(_tilted(p_arr, excess, eta, settings), p_arr) - settings.rho

    high = float(excess.max())
    if gap(high) < 0:  # even all mass on the worst domain stays inside the ball
        return kept
    # The callback's lower end; doubled to the left until the root is bracketed.
    low = -(1.0 / (math.sqrt(2 * settings.rho + 1) - 1)) * max(high, 1e-12)
    for _ in range(settings.max_iter):
        if gap(low) <= 0:
            break
        low -= 2 * (high - low)
    else:
        return kept
    eta = 0.5 * (low + high)
    for _ in range(settings.max_iter):
        eta = 0.5 * (low + high)
        value = gap(eta)
        if abs(value) <= settings.tol:
            break
        low, high = (eta, high) if value < 0 else (low, eta)
    q = _tilted(p_arr, excess, eta, settings)
    if settings.clamp_to_min_proportion:
        q = np.maximum(q, p_arr.min())
        q = q / q.sum()
    return DroUpdate(q.tolist(), eta, chi_square(q, p_arr), scale, False)


class LossEma:
    """Per-domain exponential moving average of the loss; the first observation starts it (the callback
    starts at 0, which drags early averages towards 0)."""

    def __init__(self, domains: int, ema: float = DEFAULT_EMA) -> None:
        self.ema = ema
        self.values: list[float | None] = [None] * domains

    def observe(self, domain: int, loss: float) -> None:
        if not math.isfinite(loss):  # a skipped fp16 step
            return
        old = self.values[domain]
        self.values[domain] = loss if old is None else (1 - self.ema) * old + self.ema * loss


class DroState:
    """The centre p and current proportions of a run; `update(losses)` applies DRPruning's step."""

    def __init__(self, proportions: Sequence[float], reference: Sequence[float], settings: DroSettings,
                 smoothing: float | None = None) -> None:
        self.centre = _check_vector("proportions", proportions)
        self.proportions = self.centre.copy()
        self.reference = _check_vector("reference losses", reference, len(self.centre))
        self.settings = settings
        self.smoothing = smoothing

    def update(self, losses: Sequence[float | None]) -> DroUpdate | None:
        """New proportions from per-domain losses, or None while some domain has no loss yet."""
        if any(loss is None for loss in losses):
            return None
        result = dro_update(losses, self.reference, self.centre, self.settings)
        self.proportions = np.asarray(result.proportions)
        if self.smoothing:
            self.centre = (1 - self.smoothing) * self.centre + self.smoothing * self.proportions
            self.centre = self.centre / self.centre.sum()
        return result

    def state_dict(self) -> dict:
        return {"centre": self.centre.tolist(), "proportions": self.proportions.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.centre = np.asarray(state["centre"], dtype=np.float64)
        self.proportions = np.asarray(state["proportions"], dtype=np.float64)

"""Uncertainty for every table cell: percentile bootstrap confidence intervals over evaluation units
(examples for accuracy, macro-F1 and ROUGE; scored windows of the text for perplexity) and a paired
bootstrap of the difference between two models on the same units.

Why a bootstrap: the metrics are means (accuracy, ROUGE), ratios of sums (token-weighted perplexity) or
non-linear (macro-F1, exp of a mean), and one resampling scheme covers all of them. Paired: both models
are scored on the same resampled units, so the shared difficulty of each example cancels and small
differences can be told from noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dpruner.errors import DPrunerError

# Ours: 2,000 resamples keep the Monte-Carlo error of a 95 % percentile interval's ends well below the
# interval's width for the set sizes used here (>= 30 units); fixed seed so tables are reproducible.
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# A statistic maps unit-level columns (already resampled: arrays indexed by unit) to one number.
Statistic = Callable[[dict[str, np.ndarray]], float]


def mean_of(field: str) -> Statistic:
    return lambda units: float(np.mean(units[field]))


def exp_mean_of(field: str) -> Statistic:
    """exp of the unweighted mean (the original's window-mean perplexity)."""
    return lambda units: float(np.exp(np.mean(units[field])))


def exp_weighted_mean(field: str, weight: str) -> Statistic:
    """exp of the weight-weighted mean (token-weighted perplexity: summed NLL over scored tokens)."""
    return lambda units: float(np.exp(np.sum(units[field] * units[weight]) / np.sum(units[weight])))


def macro_f1_of(label: str, prediction: str) -> Statistic:
    """Macro-F1 over the labels present in the (resampled) true or predicted labels with F1 = 0 where
    nothing is right: sklearn's `f1_score(average="macro", zero_division=0)`, the evaluator's number,
    in numpy (thousands of resamples)."""
    def statistic(units: dict[str, np.ndarray]) -> float:
        truth, guess = units[label], units[prediction]
        scores = []
        for value in np.union1d(truth, guess):
            hit = np.sum((truth == value) & (guess == value))
            scores.append(2 * hit / (np.sum(truth == value) + np.sum(guess == value)))
        return float(np.mean(scores))
    return statistic


def _resample_indices(n: int, samples: int, seed: int, strata: Sequence | None = None) -> np.ndarray:
    """[samples, n] unit indices drawn with replacement; with `strata` (a group per unit) each group is
    resampled within itself, so every resample keeps each group's size (e.g. per-domain held-out sets)."""
    if n < 2:
        raise DPrunerError(f"a bootstrap needs at least 2 units, got {n}")
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(samples, n))
    groups = np.asarray(strata)
    if len(groups) != n:
        raise DPrunerError(f"strata has {len(groups)} entries for {n} units")
    index = np.empty((samples, n), dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        if len(members) < 2:
            raise DPrunerError(f"a stratified bootstrap needs at least 2 units per group; {group!r} has 1")
        index[:, members] = members[rng.integers(0, len(members), size=(samples, len(members)))]
    return index


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _take(units: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {key: column[index] for key, column in units.items()}


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on all units
    low: float
    high: float


@dataclass(frozen=True)
class PairedDifference:
    difference: float  # statistic(candidate) - statistic(reference) on all units
    low: float
    high: float
    p_value: float  # two-sided bootstrap p: how often the resampled difference lies on the other side of 0

    @property
    def significant(self) -> bool:
        """The interval excludes 0: a difference beyond the noise (else report "no difference")."""
        return self.low > 0 or self.high < 0


def bootstrap_ci(units: dict[str, Sequence], statistic: Statistic, *, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED, level: float = CONFIDENCE, strata: Sequence | None = None) -> Interval:
    """Percentile bootstrap interval of `statistic` over the units (rows of equally long columns);
    `strata`: resample within each group (see `_resample_indices`)."""
    columns = {key: np.asarray(values) for key, values in units.items()}
    n = len(next(iter(columns.values())))
    draws = np.array([statistic(_take(columns, index)) for index in _resample_indices(n, samples, seed, strata)])
    return Interval(statistic(columns), *_interval(draws, level))


def paired_bootstrap(reference: dict[str, Sequence], candidate: dict[str, Sequence], statistic: Statistic, *,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = CONFIDENCE) -> PairedDifference:
    """Bootstrap of statistic(candidate) - statistic(reference), both resampled with the same indices."""
    ref = {key: np.asarray(values) for key, values in reference.items()}
    cand = {key: np.asarray(values) for key, values in candidate.items()}
    n = len(next(iter(ref.values())))
    if len(next(iter(cand.values()))) != n:
        raise DPrunerError(f"paired bootstrap needs the same units for both models, got {n} and "
                           f"{len(next(iter(cand.values())))}")
    draws = np.array([statistic(_take(cand, index)) - statistic(_take(ref, index))
                      for index in _resample_indices(n, samples, seed)])
    difference = statistic(cand) - statistic(ref)
    low, high = _interval(draws, level)
    other_side = np.mean(draws <= 0) if difference > 0 else np.mean(draws >= 0)
    return PairedDifference(difference, low, high, float(min(1.0, 2 * other_side)))


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Across seeds: the mean and the sample standard deviation (ddof=1)."""
    if len(values) < 2:
        raise DPrunerError(f"a standard deviation needs at least 2 seeds, got {len(values)}")
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1))

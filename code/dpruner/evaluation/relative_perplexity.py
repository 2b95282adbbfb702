"""Relative perplexity per domain, exp(pruned loss - dense loss) on the same held-out examples, with 95 %
bootstrap intervals, and the paired comparison of two pruned models (DRPruning's question: does `dro`
mixing improve the worst domain over `constant` at an equal mean?).

Units are held-out examples: each carries its summed next-token NLL under the dense and the pruned
model and its token count, so every statistic (per domain, worst domain, mean over domains) is a ratio
of sums recomputed on resampled examples. Resampling is stratified by domain, so every resample keeps
each domain's size; two runs are paired on identical examples (same split, same dense model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dpruner.errors import DPrunerError
from dpruner.loss import IGNORE_INDEX
from dpruner.stats import bootstrap_ci

Units = dict[str, np.ndarray]  # domain (index), dense_nll, pruned_nll, tokens: one entry per example


@torch.no_grad()
def example_losses(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], data: Sequence[Any],
                   collate: Callable) -> list[dict[str, float]]:
    """Per example: summed NLL over its labelled tokens and their count (one forward pass each, so padding
    never enters; the token-weighted mean equals `mixing.held_out_loss` up to rounding)."""
    rows = []
    for index in range(len(data)):
        batch = collate([data[index]])
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        rows.append({"nll": float(loss_fn(batch)) * tokens, "tokens": tokens})
    return rows


def _per_domain(units: Units, nll: str) -> np.ndarray:
    """exp(mean pruned - mean dense loss) per domain index (token-weighted within the domain)."""
    count = int(units["domain"].max()) + 1
    tokens = np.bincount(units["domain"], weights=units["tokens"], minlength=count)
    gap = np.bincount(units["domain"], weights=units[nll] - units["dense_nll"], minlength=count)
    return np.exp(gap / tokens)


def domain_statistic(index: int, nll: str = "pruned_nll") -> Callable[[Units], float]:
    return lambda units: float(_per_domain(units, nll)[index])


def worst_statistic(nll: str = "pruned_nll") -> Callable[[Units], float]:
    return lambda units: float(_per_domain(units, nll).max())


def mean_statistic(nll: str = "pruned_nll") -> Callable[[Units], float]:
    return lambda units: float(_per_domain(units, nll).mean())


def units_of(domains: dict[str, dict[str, Any]]) -> Units:
    """The unit columns of a domain_perplexity.json `domains` mapping (each with its `examples`)."""
    columns: dict[str, list[float]] = {"domain": [], "dense_nll": [], "pruned_nll": [], "tokens": []}
    for index, entry in enumerate(domains.values()):
        for example in entry["examples"]:
            columns["domain"].append(index)
            for key in ("dense_nll", "pruned_nll", "tokens"):
                columns[key].append(example[key])
    units = {key: np.asarray(values) for key, values in columns.items()}
    units["domain"] = units["domain"].astype(np.int64)
    return units


def _interval(units: Units, statistic: Callable[[Units], float]) -> dict[str, float]:
    ci = bootstrap_ci(units, statistic, strata=units["domain"])
    return {"value": ci.value, "ci95_low": ci.low, "ci95_high": ci.high}


def summarize(domains: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every domain's relative perplexity, the worst one and the mean over domains, each with its 95 %
    interval; `domains` maps a name to {"examples": [{dense_nll, pruned_nll, tokens}, ...]}."""
    units = units_of(domains)
    names = list(domains)
    relative = _per_domain(units, "pruned_nll")
    worst = int(relative.argmax())
    return {"relative_perplexity": {name: _interval(units, domain_statistic(i)) for i, name in enumerate(names)},
            "worst_domain": {"name": names[worst], **_interval(units, worst_statistic())},
            "mean_relative_perplexity": _interval(units, mean_statistic())}


def compare(reference: dict[str, dict[str, Any]], candidate: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """candidate - reference for each domain's, the worst and the mean relative perplexity, paired on the
    same held-out examples (stratified by domain); `significant` when the 95 % interval excludes 0."""
    ref, cand = units_of(reference), units_of(candidate)
    if list(reference) != list(candidate) or not (np.array_equal(ref["tokens"], cand["tokens"])
                                                  and np.allclose(ref["dense_nll"], cand["dense_nll"], rtol=1e-6)):
        raise DPrunerError("the two runs were not evaluated on the same held-out examples with the same dense "
                           "model (domains, token counts or dense losses differ)")
    # One resampling of the shared examples scores both runs: the bootstrap of the difference is paired.
    joined = {**ref, "candidate_nll": cand["pruned_nll"]}

    def difference(make: Callable[[str], Callable[[Units], float]]) -> dict[str, Any]:
        ci = bootstrap_ci(joined, _minus(make), strata=joined["domain"])
        return {"difference": ci.value, "ci95_low": ci.low, "ci95_high": ci.high,
                "significant": ci.low > 0 or ci.high < 0}

    names = list(reference)
    return {"per_domain": {name: difference(lambda nll, i=i: domain_statistic(i, nll)) for i, name in enumerate(names)},
            "worst_domain": difference(worst_statistic), "mean_relative_perplexity": difference(mean_statistic)}


def _minus(make: Callable[[str], Callable[[Units], float]]) -> Callable[[Units], float]:
    candidate, reference = make("candidate_nll"), make("pruned_nll")
    return lambda units: candidate(units) - reference(units)



def comparison_markdown(runs: dict[str, dict[str, Any]], reference: str) -> str:
    """A markdown table of domain_perplexity.json results: each domain's, the worst and the mean relative
    perplexity with the 95 % intervals the results hold (`intervals`), then each run's paired difference from `reference` ("no difference"
    where the interval includes 0)."""
    def cell(entry: dict[str, float]) -> str:
        return f"{entry['value']:.4f} [{entry['ci95_low']:.4f}, {entry['ci95_high']:.4f}]"

    def delta(entry: dict[str, Any]) -> str:
        verdict = "" if entry["significant"] else " (no difference)"
        return f"{entry['difference']:+.4f} [{entry['ci95_low']:+.4f}, {entry['ci95_high']:+.4f}]{verdict}"

    names = list(runs[reference]["domains"])
    header = ["run", *(f"{n} rel. ppl" for n in names), "worst domain", "mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, run in runs.items():
        summary = run["intervals"]
        worst = summary["worst_domain"]
        lines.append("| " + " | ".join([label, *(cell(summary["relative_perplexity"][n]) for n in names),
                                        f"{worst['name']} {cell(worst)}", cell(summary["mean_relative_perplexity"])])
                     + " |")
    for label, run in runs.items():
        if label == reference:
            continue
        diff = compare(runs[reference]["domains"], run["domains"])
        lines.append("| " + " | ".join([f"{label} − {reference} (paired)",
                                        *(delta(diff["per_domain"][n]) for n in names),
                                        delta(diff["worst_domain"]), delta(diff["mean_relative_perplexity"])]) + " |")
    return "\n".join(lines)

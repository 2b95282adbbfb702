"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): one sparsity per decoder block.

A block's outlier ratio D_l is the fraction of its projection weights whose Wanda score
|W_ij| * ||X_j|| exceeds M times the block's mean score, measured on the dense model (inputs
propagated through the dense blocks, as the OWL code and llm-compressor's `sparsity_profile="owl"`
do). The ratios are scaled to [0, 2*lambda] and centred: s_l = target - (D~_l - mean D~), so blocks
with more outliers are pruned less and the mean is the target.

Exact overall sparsity: every comparison group a method uses (matrix, row, column block, OBS block)
spans whole columns in multiples of G = gcd of the group widths, so a block sparsity k_l / G prunes
an integer number of weights in every group. The k_l are the s_l * G rounded by largest remainder to
sum to target * G * L, so the pruned fraction over all projections is exactly that (decoder blocks
have equal sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dpruner.errors import DPrunerError
from dpruner.layerwise import LayerSource, ResidentLayers, collect_stats, run_layer
from dpruner.models import PROJECTIONS, projection_modules

PROFILES = ("uniform", "owl")
# The OWL paper's LLaMA setting (M = 5, lambda = 0.08; luuyin/OWL scripts --Hyper_m 5 --Lamda 0.08).
DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


@dataclass
class OwlProfile:
    m: float = DEFAULT_M
    lam: float = DEFAULT_LAMBDA

    def check(self, target: float) -> None:
        if self.m <= 0:
            raise DPrunerError(f"--owl-m must be > 0, got {self.m}")
        if not 0 <= self.lam:
            raise DPrunerError(f"--owl-lambda must be >= 0, got {self.lam}")
        if target - self.lam < 0 or target + self.lam >= 1:
            raise DPrunerError(f"--owl-lambda {self.lam} around --sparsity {target} gives block sparsities outside "
                               "[0, 1); choose a smaller --owl-lambda")

    def settings(self) -> dict:
        return {"sparsity_profile": "owl", "owl_m": self.m, "owl_lambda": self.lam}


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all entries above m times their common mean (OWL's check_outlier_mean)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, calibration: dict[str, torch.Tensor], m: float, *, batch_size: int,
                         device: torch.device, source: LayerSource | None = None) -> list[float]:
    """D_l of every decoder block on the dense model, all calibration sets pooled."""
    source = source or ResidentLayers(model, device)
    inputs = list(source.capture(model, calibration, batch_size).values())
    ratios = []
    for index in tqdm(range(len(model.model.layers)), desc="OWL outlier ratios", unit="layer"):
        layer = source.fetch(index)
        linears = projection_modules(layer)
        per_set = [collect_stats(layer, PROJECTIONS, layer_inputs, with_hessian=False) for layer_inputs in inputs]
        scores = []
        for name in PROJECTIONS:
            norms = torch.sqrt(sum(s[name].sq_norms for s in per_set) / sum(s[name].nsamples for s in per_set))
            scores.append(linears[name].weight.float().abs() * norms.unsqueeze(0))
        ratios.append(outlier_ratio(scores, m))
        inputs = [run_layer(layer, layer_inputs) for layer_inputs in inputs]
        source.release(index, layer)
    return ratios


def block_sparsities(ratios: list[float], target: float, lam: float, quantum: int) -> list[float]:
    """OWL's s_l, each a multiple of 1/quantum, summing exactly to round(target * quantum * L) / quantum."""
    low, high = min(ratios), max(ratios)
    spread = [0.0 if high == low else (r - low) / (high - low) * 2 * lam for r in ratios]
    centre = sum(spread) / len(spread)
    ideal = [(target - (s - centre)) * quantum for s in spread]
    counts = [math.floor(x) for x in ideal]
    left = round(target * quantum * len(ratios)) - sum(counts)
    for index in sorted(range(len(ideal)), key=lambda i: (counts[i] - ideal[i], i))[:left]:
        counts[index] += 1
    # Just above k/quantum, so int(n * s) is exactly n * k / quantum for every group size n it divides.
    return [math.nextafter(k / quantum, math.inf) for k in counts]


def group_quantum(model_layer: nn.Module, widths) -> int:
    """G = gcd of the column widths of every comparison group of every projection (`widths(in_features)`)."""
    quantum = 0
    for linear in projection_modules(model_layer).values():
        for width in widths(linear.in_features):
            quantum = math.gcd(quantum, width)
    return quantum


def add_profile_options(parser) -> None:
    """`--sparsity-profile`, `--owl-m`, `--owl-lambda` of the layer-wise pruning CLIs."""
    parser.add_argument("--sparsity-profile", choices=PROFILES, default="uniform",
                        help="uniform: --sparsity in every decoder block; owl: one sparsity per block from its "
                             "outlier ratio, mean = --sparsity exactly (Yin et al. 2024; needs calibration data, "
                             "also for data-free methods)")
    parser.add_argument("--owl-m", type=float, default=DEFAULT_M,
                        help="OWL: a weight is an outlier above M x its block's mean Wanda score (OWL paper)")
    parser.add_argument("--owl-lambda", type=float, default=DEFAULT_LAMBDA,
                        help="OWL: block sparsities span target +- lambda (OWL paper, LLaMA)")


def profile_from_args(args) -> OwlProfile | None:
    return OwlProfile(args.owl_m, args.owl_lambda) if args.sparsity_profile == "owl" else None


def apply_profile(profile: OwlProfile, method, model: nn.Module, calibration: dict[str, torch.Tensor], *,
                  batch_size: int, device: torch.device, source: LayerSource | None = None) -> dict:
    """Measure the outlier ratios and set `method.layer_sparsity`; returns what to report."""
    ratios = block_outlier_ratios(model, calibration, profile.m, batch_size=batch_size, device=device, source=source)
    quantum = group_quantum(model.model.layers[0], method.group_widths)
    method.layer_sparsity = block_sparsities(ratios, method.sparsity, profile.lam, quantum)
    return {**profile.settings(), "outlier_ratios": ratios, "layer_sparsity": method.layer_sparsity,
            "quantum": quantum}

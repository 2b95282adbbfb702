"""The interface every pruning method implements, and the registry that finds them by name.

A method sees one linear layer at a time: its weight and the calibration statistic it asked for
(the input Hessian, the per-column input norms, or nothing). It returns the scores it ranked by and
the weight it leaves behind (pruned, and for OBS methods also compensated). The layer-wise driver in
`dpruner.layerwise` does the rest: capturing inputs, sequential propagation, saving, resuming.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from dpruner.errors import DPrunerError


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's inputs, summed over tokens.

    `xtx` is sum x x^T (only when a method asks for the Hessian), `sq_norms` is sum x_j^2 per input
    column, `nsamples` counts calibration sequences (SparseGPT's H = 2/nsamples * xtx).
    """

    xtx: torch.Tensor | None
    sq_norms: torch.Tensor
    nsamples: int

    def hessian(self) -> torch.Tensor:
        if self.xtx is None:
            raise RuntimeError("the Hessian was not collected for this method")
        return self.xtx * (2.0 / self.nsamples)


@dataclass
class LayerOutcome:
    scores: torch.Tensor  # what the method ranked by (fp32, weight shape); saved as the layer's scores
    weight: torch.Tensor  # the weight to leave in the layer
    mask: torch.Tensor  # bool, True = pruned
    loss: float | None = None  # method-specific reconstruction loss, when it has one


class PruningMethod(ABC):
    """One method. `statistic` says what the driver must collect: "hessian", "input_norms" or None."""

    name: ClassVar[str]
    statistic: ClassVar[str | None]
    # Names of the calibration sets a method weighs separately (MixCal); None = one pooled set.
    calibration_sets: ClassVar[tuple[str, str] | None] = None

    # One sparsity per decoder block (OWL, `dpruner.owl`); None = `self.sparsity` in every block.
    layer_sparsity: list[float] | None = None

    def sparsity_at(self, layer: int) -> float:
        return self.sparsity if self.layer_sparsity is None else self.layer_sparsity[layer]  # type: ignore[attr-defined]

    def group_widths(self, in_features: int) -> tuple[int, ...]:
        """Column widths of the groups the method ranks within (OWL rounds block sparsities to them)."""
        return (in_features,)

    @abstractmethod
    def prune(self, layer: int, module_name: str, weight: torch.Tensor,
              stats: dict[str, LayerStats] | None) -> LayerOutcome:
        """Prune one linear (`module_name` of decoder layer `layer`). `stats` maps calibration-set
        name to statistics (None for data-free methods)."""

    def settings(self) -> dict:
        """What identifies a run of this method (stored in score manifests)."""
        return {"method": self.name}


_REGISTRY: dict[str, type[PruningMethod]] = {}
# Modules that register a method when imported; one line per method module.
_METHOD_MODULES = ("sparsegpt", "magnitude", "wanda", "mixcal", "dpruner", "dpruner_obs")


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(f"dpruner.methods.{module}")


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str, **options) -> PruningMethod:
    _load_all()
    if name not in _REGISTRY:
        raise DPrunerError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def single_set(stats: dict[str, LayerStats] | None, method: str) -> LayerStats:
    """The statistics of the only calibration set (methods that use one set)."""
    if not stats or len(stats) != 1:
        raise DPrunerError(f"method {method} needs exactly one calibration set, got {len(stats or {})}")
    return next(iter(stats.values()))

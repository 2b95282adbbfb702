"""Pruning methods behind one interface; `get_method(name, **options)` builds one by name."""

from __future__ import annotations

from dpruner.methods.base import LayerOutcome, PruningMethod, get_method, method_names, register

__all__ = ["LayerOutcome", "PruningMethod", "get_method", "method_names", "register"]

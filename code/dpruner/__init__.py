"""D-Pruner reproduction: dual (general + domain) importance pruning for LLMs.

Python API (docs/API.md): `from dpruner import DPruner, DPrunerConfig, prune`.
"""

__version__ = "0.1.0"
_API = ("DPruner", "DPrunerConfig", "prune")


def __getattr__(name: str):
    """The API names, imported on first use so `import dpruner` (every CLI does) stays light."""
    if name in _API:
        from dpruner import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpruner' has no attribute {name!r}")

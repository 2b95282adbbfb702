"""D-Pruner reproduction: dual (general + domain) importance pruning for LLMs."""

__version__ = "0.1.0"

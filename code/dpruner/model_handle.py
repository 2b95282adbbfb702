"""One resolved model for a whole run: where it is, its config, tokenizer and checkpoint files.

The pruning stages used to pass the user's model string around and re-resolve it (config for the
structure check, again for the tokenizer, again for the weights). A `ModelHandle` resolves it once;
the structure check, the tokenizer, the in-memory load and the layer-by-layer checkpoint reader all
come from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpruner.errors import DPrunerError
from dpruner.models import build_skeleton, load_model, load_tokenizer, read_config, resolve_model


@dataclass
class ModelHandle:
    """`name` as the user gave it; `path` a local folder or a hub id; `config` read once."""

    name: str
    path: str
    config: Any
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def resolve(cls, model: str | ModelHandle) -> ModelHandle:
        if isinstance(model, ModelHandle):
            return model
        path = resolve_model(model)
        return cls(model, path, read_config(path, model))

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()

    @cached_property
    def skeleton(self) -> nn.Module:
        """The model on the meta device (no weights), checked to be a supported architecture."""
        return build_skeleton(self.config, self.name)

    @property
    def num_layers(self) -> int:
        return len(self.skeleton.model.layers)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.path)

    @cached_property
    def checkpoint(self):
        """The layer-by-layer reader of the safetensors checkpoint (local folders only)."""
        from dpruner.streaming import CheckpointReader

        if not self.is_local:
            raise DPrunerError(f"model {self.name!r}: streaming (--offload disk) needs a local model folder; "
                               "download it first (huggingface-cli download NAME --local-dir DIR)")
        return CheckpointReader(Path(self.path))

    def load(self, dtype: str = "auto", device: torch.device | str | None = None) -> nn.Module:
        """The whole model in memory (the non-streamed path)."""
        return load_model(self.path, dtype=dtype, device=device)

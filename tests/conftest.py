"""Shared fixtures: a tiny random Llama (fast unit tests), the embedded model (integration tests),
and a helper that runs a CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
CODE = REPO / "code"


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    from dpruner.models import embedded_model_dir
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(embedded_model_dir()))
    params = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params.update(overrides)
    return LlamaConfig(**params)


def make_tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM sharing the embedded model's tokenizer (so CLIs can run on it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.config.use_cache = False
    return model.eval()


def save_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import AutoTokenizer

    from dpruner.models import embedded_model_dir

    model = make_tiny_llama(seed, **overrides)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The embedded SmolLM2-135M as a Hugging Face folder (converted once, cached)."""
    from dpruner.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_model) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def run_cli(script: str, *args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `code/<script>` with this interpreter; returns the completed process (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(CODE / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line a CLI printed for bad input (asserts there is exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]

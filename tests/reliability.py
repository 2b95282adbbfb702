"""Helpers of the reliability suites (test_badinput.py, test_faults.py): run a CLI in-process, snapshot
files by sha256, and build the small inputs every case needs."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from conftest import CODE
from dpruner import cli
from dpruner.io import TEMP_MARK, save_score_folder
from dpruner.models import decoder_layers, projection_modules
from dpruner.provenance import FINGERPRINT_KEY, fingerprint


@lru_cache(maxsize=None)
def script_main(script: str):
    """The `main` of `code/<script>`, imported once (importing torch per case would dominate the run)."""
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", CODE / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_inprocess(capsys, script: str, *args) -> subprocess.CompletedProcess:
    """A CLI as `cli.run` runs it (exit code, stdout, stderr); an exception that escapes would be a
    traceback for the user, so it fails the test."""
    with pytest.raises(SystemExit) as exited:
        cli.run(script_main(script), [str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], exited.value.code, captured.out, captured.err)


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (symlinks not followed)."""
    digests = {}
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def debris(root: Path) -> list[Path]:
    """Temporary files or folders left anywhere under `root`."""
    return [Path(folder) / name for folder, dirs, files in os.walk(root) for name in dirs + files
            if TEMP_MARK in name or name == "_resume"]


def random_scores(model_dir: Path, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.rand(linear.weight.shape, generator=generator) for name, linear in
             projection_modules(layer).items()} for layer in decoder_layers(model)]


def write_scores(folder: Path, model_dir: Path, kind: str = "dual_importance", seed: int = 0) -> Path:
    """A complete score folder recording `model_dir`'s fingerprint, as stages 1 and 2 write it."""
    return save_score_folder(folder, random_scores(model_dir, seed), kind=kind, model=str(model_dir), settings={},
                             extra={FINGERPRINT_KEY: fingerprint(str(model_dir))})


def readonly_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in: chmod 0500, or for root (who ignores modes) /sys."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no read-only location available to this user")

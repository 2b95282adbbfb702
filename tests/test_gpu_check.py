"""bench/gpu_check.sh: without a GPU it says so and runs nothing; its plan fits the 8-minute budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_check import TOTAL_BUDGET_S, steps  # noqa: E402


def test_without_a_gpu_it_prints_no_gpu_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no GPU") and "|" not in result.stdout
    assert not out.exists()


def test_plan_fits_the_budget_and_names_existing_scripts(tmp_path):
    plan = steps(tmp_path, sys.executable)
    assert sum(step.budget_s for step in plan if not step.background) <= TOTAL_BUDGET_S
    background = [step for step in plan if step.background]
    assert all(step.budget_s <= TOTAL_BUDGET_S for step in background)
    for step in plan:
        scripts = [Path(arg) for arg in step.command if arg.endswith(".py")]
        assert scripts and all((REPO / script).exists() for script in scripts), step.name
    assert {"sparse24", "stage2-gpu", "stage2-cpu", "eval", "stage1-7b"} <= {step.name for step in plan}

"""Evaluate a loaded (pruned) model with lm-evaluation-harness 0.4.x, as users evaluate other pruned models.

The model goes in as an object (`HFLM(pretrained=model, tokenizer=tokenizer)`), so pruned weights are
never re-read from disk by lm-eval. Our own sets ship as local task YAMLs in config/lm_eval_tasks/
(`dataset_path: json` + `data_files`, paths relative to the repository root); they are copied with
absolute data paths into a temporary include folder, so a run works offline from any directory and
with another data root. Hub task names (boolq, arc_easy, hellaswag, ...) pass through to lm-eval.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from dpruner.errors import DPrunerError
from dpruner.paths import PREPARED_DATA_DIR, REPO_ROOT, data_dir

TASKS_DIR = REPO_ROOT / "config" / "lm_eval_tasks"


def local_tasks() -> dict[str, Path]:
    """Our shipped task YAMLs by task name."""
    return {yaml.safe_load(path.read_text())["task"]: path for path in sorted(TASKS_DIR.glob("*.yaml"))}


def _rooted(path: str, root: Path) -> str:
    """A YAML data path (relative to the repo root, under legal_pruning_data/data) moved to `root`."""
    absolute = (REPO_ROOT / path).resolve()
    try:
        return str(root / absolute.relative_to(PREPARED_DATA_DIR))
    except ValueError:
        return str(absolute)


@contextlib.contextmanager
def local_task_dir(root: str | None = None) -> Iterator[Path]:
    """A temporary folder of the local task YAMLs with absolute `data_files` under the data root `root`."""
    with tempfile.TemporaryDirectory(prefix="dpruner-lm-eval-") as tmp:
        yield _write_tasks(Path(tmp), data_dir(root))


def _write_tasks(folder: Path, base: Path) -> Path:
    for name, source in local_tasks().items():
        spec = yaml.safe_load(source.read_text())
        files = spec["dataset_kwargs"]["data_files"]
        spec["dataset_kwargs"]["data_files"] = {split: _rooted(path, base) for split, path in files.items()}
        for split, path in spec["dataset_kwargs"]["data_files"].items():
            if not Path(path).is_file():
                raise DPrunerError(f"lm-eval task {name}: {split} data {path} is missing; run "
                                   "`python legal_pruning_data/prepare.py` or pass --data-dir")
        (folder / source.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder


def task_manager(include_dir: Path, tasks: Sequence[str]):
    """lm-eval's task index; its built-in tasks (thousands of YAMLs, seconds to index) only when needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_dir), include_defaults=not set(tasks) <= set(local_tasks()))


def check_tasks(tasks: Sequence[str], manager) -> None:
    """Unknown task names fail before any model is loaded."""
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise DPrunerError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; local tasks: "
                           f"{', '.join(local_tasks())}, or any lm-eval task name (lm_eval ls tasks)")


def run_lm_eval(model, tokenizer, tasks: Sequence[str], manager, *, limit: int | None = None,
                batch_size: int = 1, num_fewshot: int | None = None, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an in-memory model; returns its result dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                               task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
    except (OSError, ConnectionError) as err:  # hub task offline, or its dataset cannot be fetched
        raise DPrunerError(f"lm-eval could not load a task's data ({str(err).splitlines()[0]}); hub tasks need "
                           "network access (unset HF_DATASETS_OFFLINE), local tasks need prepare.py") from None

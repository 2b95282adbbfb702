"""Python API: D-Pruner's four stages and every baseline as calls, for notebooks and other libraries.

Each call builds the command line of the matching CLI (general.py, src/train_lomo.py, save_model.py,
save_model_iterative.py, domain_evaluation.py, prune_baseline.py) and runs its `main` in this
process, so the API validates, computes and writes exactly what the CLIs do (tests/test_api.py checks
it). An in-memory Hugging Face model is saved once to the work folder and used from there, because
every stage reads the original weights from a folder. Examples: docs/API.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from dpruner.errors import DPrunerError
from dpruner.paths import REPO_ROOT

CODE_DIR = REPO_ROOT / "code"
BLOCKINGS = {"matrix": "save_model.py", "iterative": "save_model_iterative.py"}
# The general (WikiText-2 / C4) perplexity, evaluated next to a domain's own tasks.
GENERAL_TASK = "general_perplexity"
STAGE2_CONFIG = REPO_ROOT / "config" / "args_lomo.yaml"
_MODULES: dict[str, ModuleType] = {}


def _cli(script: str) -> ModuleType:
    """The CLI module `code/<script>` (loaded once)."""
    if script not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"dpruner_cli_{Path(script).stem}", CODE_DIR / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


def _run(script: str, argv: Sequence[Any]) -> None:
    argv = [str(a) for a in argv]
    try:
        code = _cli(script).main(argv)
    except SystemExit as exit_:  # argparse refused an option; it printed the reason
        code = exit_.code
    if code:
        raise DPrunerError(f"{script} {' '.join(argv)}: exited with {code} (its error is printed above)")


def _options(**options: Any) -> list[str]:
    """`--key value` for every option that is set (None = the CLI's default); True = a bare flag."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def _domain_arg(domain: str | os.PathLike) -> str:
    """A shipped name stays; a YAML path is made absolute (relative to the caller's directory)."""
    path = Path(domain).expanduser()
    return str(path.resolve()) if path.is_file() else str(domain)


@dataclass
class DPrunerConfig:
    """Settings shared by the stages; None means the CLI's default (the paper's / original's value)."""

    nsamples: int | None = None  # calibration windows (stage 1 and the baselines)
    seqlen: int | None = None
    seed: int | None = None
    windowing: str | None = None
    c4_source: str | None = None
    data_dir: str | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    stage2_config: str | os.PathLike = STAGE2_CONFIG
    train: dict[str, Any] = field(default_factory=dict)  # stage-2 `key: value` overrides (max_steps, ...)
    work_dir: str | os.PathLike | None = None  # where scores and models go (default: a new temp folder)
    overwrite: bool = False

    def calibration_options(self) -> list[str]:
        return _options(nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed, windowing=self.windowing,
                        c4_source=self.c4_source, data_dir=self.data_dir)

    def device_options(self) -> list[str]:
        return _options(dtype=self.dtype, device=self.device)


def _model_folder(model_or_path: Any, tokenizer: Any, work: Path) -> str:
    """A model name/folder as it is; an in-memory model saved (with its tokenizer) under `work`."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return str(model_or_path)
    if not hasattr(model_or_path, "save_pretrained"):
        raise DPrunerError(f"model must be a name, a folder or a Hugging Face model, got {type(model_or_path).__name__}")
    if tokenizer is None:
        raise DPrunerError("an in-memory model needs tokenizer= (a tokenizer object, or its name or folder)")
    from dpruner.models import load_tokenizer

    folder = work / "model"
    model_or_path.save_pretrained(folder)
    (load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer).save_pretrained(folder)
    return str(folder)


def _work_dir(config: DPrunerConfig) -> Path:
    work = Path(config.work_dir).expanduser().resolve() if config.work_dir else Path(tempfile.mkdtemp(prefix="dpruner-"))
    work.mkdir(parents=True, exist_ok=True)
    return work


class DPruner:
    """D-Pruner on one model: general importance (stage 1), dual importance (stage 2), masks (stage 3),
    evaluation (stage 4). Each step writes under `config.work_dir` and returns what it wrote."""

    def __init__(self, model_or_path: Any, config: DPrunerConfig | None = None, tokenizer: Any = None):
        self.config = config or DPrunerConfig()
        self.work = _work_dir(self.config)
        self.model = _model_folder(model_or_path, tokenizer, self.work)
        self.general: Path | None = None
        self.dual: Path | None = None
        self.domain: str | None = None
        self.pruned: Path | None = None

    def _overwrite(self) -> list[str]:
        return ["--overwrite"] if self.config.overwrite else []

    def general_importance(self, calibration: str = "c4", sparsity: float | None = None) -> Path:
        """Stage 1 (general.py): SparseGPT saliency on `calibration` (c4, or a domain name / YAML)."""
        out = self.work / "general_importance"
        _run("general.py", [self.model, _domain_arg(calibration), "--out", out, *_options(sparsity=sparsity,
             batch_size=self.config.batch_size), *self.config.calibration_options(), *self.config.device_options(),
             *self._overwrite()])
        self.general = out
        return out

    def dual_importance(self, domain: str | os.PathLike = "legal", **train: Any) -> Path:
        """Stage 2 (src/train_lomo.py): LOMO fine-tuning on `domain`'s training strings with the
        regularizer on the stage-1 scores; `train` are stage-2 config keys (max_steps=4, ...)."""
        if self.general is None and train.get("regularizer", self.config.train.get("regularizer")) != "none":
            raise DPrunerError("dual_importance needs the general importance: call general_importance() first")
        settings = {"model_name_or_path": self.model, "domain": _domain_arg(domain), "deepspeed": None,
                    "general_importance_dir": str(self.general or ""), "output_dir": str(self.work / "lomo"),
                    "overwrite_output_dir": self.config.overwrite, **self.config.train, **train}
        if self.config.data_dir:
            settings.setdefault("data_dir", self.config.data_dir)
        _run("src/train_lomo.py", [self.config.stage2_config,
                                   *(f"{k}={'null' if v is None else json.dumps(v) if isinstance(v, bool) else v}"
                                     for k, v in settings.items())])
        self.dual, self.domain = self.work / "lomo" / "importance", _domain_arg(domain)
        return self.dual

    def prune(self, sparsity: float | None = None, blocking: str = "matrix", pattern: str | None = None,
              blocks: int | None = None, scores: str | os.PathLike | None = None) -> Path:
        """Stage 3 (save_model.py / save_model_iterative.py): masks from the dual importance (or `scores`)
        applied to the ORIGINAL weights; returns the pruned Hugging Face folder."""
        if blocking not in BLOCKINGS:
            raise DPrunerError(f"blocking={blocking!r}; expected one of {', '.join(BLOCKINGS)}")
        if blocking == "matrix" and blocks is not None:
            raise DPrunerError("blocks applies to blocking='iterative'")
        scores = scores or self.dual
        if scores is None:
            raise DPrunerError("prune needs scores: call dual_importance() first or pass scores=")
        out = self.work / f"dpruner-{blocking}"
        _run(BLOCKINGS[blocking], [self.model, scores, out, *_options(sparsity=sparsity, pattern=pattern, blocks=blocks),
                                   *self.config.device_options(), *self._overwrite()])
        self.pruned = out
        return out

    def evaluate(self, tasks: Iterable[str] = ("perplexity",), domain: str | os.PathLike | None = None,
                 model: str | os.PathLike | None = None, **options: Any) -> dict[str, dict[str, Any]]:
        """Stage 4: each task of `domain` (default: the one trained on) or `general_perplexity`, on
        `model` (default: the pruned model, else the dense one); `options` are the evaluation CLIs'
        (limit=20, max_length=512, greedy=True, ...). Returns {result name: result JSON}."""
        from dpruner.data.spec import load_domain

        target = str(model or self.pruned or self.model)
        domain = _domain_arg(domain or self.domain or "legal")
        spec = load_domain(domain)
        folder = self.work / "eval" / Path(target.rstrip("/")).name
        results = {}
        for task in tasks:
            name = GENERAL_TASK if task == GENERAL_TASK else spec.result_name(task)
            out = folder / f"{name}.json"
            script, extra = (("general_perplexity_evaluation.py", []) if task == GENERAL_TASK
                             else ("domain_evaluation.py", ["--domain", domain, "--task", task]))
            _run(script, [self.model, target, *extra, "--out", out, *_options(**options),
                          *_options(data_dir=self.config.data_dir), *self.config.device_options()])
            results[name] = json.loads(out.read_text())
        return results

    def save(self, path: str | os.PathLike) -> Path:
        """Copy the pruned model folder (with pruning_report.json) to `path`, atomically."""
        from dpruner.io import atomic_dir

        if self.pruned is None:
            raise DPrunerError("nothing to save: call prune() first")
        target = Path(path).expanduser().resolve()
        if target.exists() and not self.config.overwrite:
            raise DPrunerError(f"{target} exists; set DPrunerConfig(overwrite=True) to replace it")
        with atomic_dir(target) as tmp:
            shutil.copytree(self.pruned, tmp, dirs_exist_ok=True)
        return target


def prune(model_or_path: Any, method: str = "wanda", calibration: str = "c4", sparsity: float | None = None,
          pattern: str | None = None, out: str | os.PathLike | None = None, config: DPrunerConfig | None = None,
          tokenizer: Any = None, **options: Any) -> Path:
    """A baseline (prune_baseline.py): magnitude | wanda | sparsegpt | mixcal | dpruner | llm-pruner on
    `calibration` (c4, a domain name or YAML, or mix with domain=...); `options` are the CLI's other
    options (domain="legal", alpha=0.5, scores=..., scope=..., save_scores=...). Returns the pruned folder."""
    config = config or DPrunerConfig()
    work = _work_dir(config)
    target = Path(out).expanduser().resolve() if out else work / method
    if "domain" in options and options["domain"] is not None:
        options["domain"] = _domain_arg(options["domain"])
    _run("prune_baseline.py", [method, _model_folder(model_or_path, tokenizer, work), target,
                               "--calibration", _domain_arg(calibration),
                               *_options(sparsity=sparsity, pattern=pattern, batch_size=config.batch_size, **options),
                               *config.calibration_options(), *config.device_options(),
                               *(["--overwrite"] if config.overwrite else [])])
    return target

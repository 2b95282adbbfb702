"""Sweeps: quality against sparsity for several pruning methods, or against stage 2's lambda.

Every point is pruned and evaluated by the project's CLIs run as subprocesses, so a point is exactly
the command a user would type (and its output is in OUT/logs/<point>.log). The metric set is cheap but
meaningful: domain perplexity, the domain's multiple-choice accuracy and WikiText-2 perplexity, read back
with `dpruner.tables` so the numbers are the ones the paper-style tables show.

Resuming: a point is finished when its evaluation JSONs exist; each point (and each stage-2 run) records
the recipe it was computed with, and a rerun that would compute it differently is refused before any work.
"""

from __future__ import annotations

import csv
import io
import math
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dpruner import tables
from dpruner.data.spec import VALIDATION, load_domain
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME
from dpruner.io import ScoreSet, atomic_path, read_json, write_json

CODE_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CODE_DIR.parent
KINDS = ("sparsity", "lambda")
# prune_baseline.py's unstructured methods; llm-pruner's --sparsity counts all parameters, another axis.
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt", "mixcal", "dpruner", "dpruner-obs", "dpruner-obs-saliency",
                    "dpruner-obs-blend")
# Methods that read --scores (D-Pruner's stage-2 importance), and the prune_baseline.py --selection of
# the D-Pruner-OBS variants (issue 10: keep whichever is better on validation, report both); the blend
# variant is one point per --blends value.
SCORE_METHODS = ("dpruner", "dpruner-obs", "dpruner-obs-saliency", "dpruner-obs-blend")
OBS_SELECTION = {"dpruner-obs": "mask", "dpruner-obs-saliency": "saliency", "dpruner-obs-blend": "blend"}
BLEND_METHOD = "dpruner-obs-blend"
DOMAIN_CALIBRATION_METHODS = ("mixcal", *OBS_SELECTION)  # C4 + domain Hessians
LAMBDA_METHOD = "dpruner"
DENSE = tables.DENSE
SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "dpruner-sweep/1"
RESULTS_CSV = "results.csv"
TABLE_MD = "table.md"
PLOT = "pareto.png"
STATE_FILE = "trainer_state.json"  # stage 2's marker of a finished run

# Per domain: (perplexity task, multiple-choice task); task name -> evaluation CLI.
DOMAIN_TASKS = {"legal": ("legal_perplexity", "casehold"), "medical": ("medical_perplexity", "pubmedqa")}
WIKITEXT_TASK = "general_perplexity"
# --split validation: the domain's validation text, WikiText-2 validation and held-out C4 (issue 10: the
# lambda is chosen there, never on test text).
SPLITS = ("test", "validation")
GENERAL_VALIDATION_TASK = tables.GENERAL_VALIDATION_TASK
SCRIPTS = {"legal_perplexity": "legal_perplexity_evaluation.py", "casehold": "test_casehold.py",
           "medical_perplexity": "medical_perplexity_evaluation.py", "pubmedqa": "test_pubmedqa.py",
           WIKITEXT_TASK: "general_perplexity_evaluation.py", GENERAL_VALIDATION_TASK: "general_perplexity_evaluation.py",
           **{f"{domain}_{VALIDATION}_perplexity": "domain_evaluation.py" for domain in DOMAIN_TASKS}}
JACCARD_COLUMN = "mask_jaccard_vs_lambda0"  # lambda sweep: pooled Jaccard of pruned positions against lambda = 0
TRADEOFF_PLOT = "tradeoff.png"
STAGE2_CONFIGS = {"legal": "config/args_lomo.yaml", "medical": "config/args_lomo_medical.yaml"}
# Stage-2 keys the lambda sweep sets itself; --train-args must leave them alone.
STAGE2_RESERVED = ("model_name_or_path", "general_importance_dir", "output_dir", "regularizer", "regularizer_lambda")
# lambda = 0 adds nothing whatever the form, so it is one stage-2 run without a regularizer, shared by
# every form of the sweep as the reference of its Jaccard and of its trade-off curve.
NO_REGULARIZER = "none"


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation sizes: the --quick pipeline's, with more multiple-choice rows so accuracy differences
    of a few points are visible (200 rows: standard error ~3.5 points)."""

    ppl_limit: int = 20
    ppl_max_length: int = 512
    ppl_stride: int = 256
    choice_limit: int = 200
    wiki_limit: int = 600
    wiki_seqlen: int = 512

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise DPrunerError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.ppl_stride > self.ppl_max_length:
            raise DPrunerError(f"--ppl-stride {self.ppl_stride} must not exceed --ppl-max-length {self.ppl_max_length}")

    def task_args(self, task: str) -> list[str]:
        general = {WIKITEXT_TASK: ["wikitext2"], GENERAL_VALIDATION_TASK: ["wikitext2_validation", "c4"]}
        if task in general:
            return ["--datasets", *general[task], "--max-length", str(self.wiki_seqlen), "--limit", str(self.wiki_limit)]
        domain_args = []
        if task.endswith(f"_{VALIDATION}_perplexity"):
            domain_args = ["--domain", task.removesuffix(f"_{VALIDATION}_perplexity"), "--task", VALIDATION]
        if task.endswith("_perplexity"):
            return [*domain_args, "--max-length", str(self.ppl_max_length), "--stride", str(self.ppl_stride),
                    "--limit", str(self.ppl_limit)]
        return ["--limit", str(self.choice_limit)]


@dataclass(frozen=True)
class Point:
    label: str
    method: str  # a prune_baseline.py method, or DENSE
    sparsity: float
    lam: float | None = None  # the lambda sweep's stage-2 regularizer weight
    form: str = NO_REGULARIZER  # the lambda sweep's regularizer form (none at lambda = 0)
    blend: float | None = None  # dpruner-obs-blend's weight of the dual importance

    @property
    def stage2(self) -> Stage2Run:
        return Stage2Run(self.form, self.lam)


@dataclass(frozen=True)
class Stage2Run:
    """One stage-2 run of the lambda sweep: a regularizer form at a lambda (form none at lambda = 0)."""

    form: str
    lam: float

    @property
    def name(self) -> str:
        """Shortest exact lambda, so two different values never share a folder; lambda0.0 has no form."""
        return f"lambda{self.lam!r}" if self.form == NO_REGULARIZER else f"{self.form}-lambda{self.lam!r}"


LAMBDA0_RUN = Stage2Run(NO_REGULARIZER, 0.0)  # the shared reference run of every form


def _method_point(method: str, sparsity: float, blend: float | None = None) -> Point:
    return Point(f"{method}{'' if blend is None else repr(blend)}-s{sparsity!r}", method, sparsity, blend=blend)


def _lambda_point(run: Stage2Run, sparsity: float) -> Point:
    return Point(f"{run.name}-s{sparsity!r}", LAMBDA_METHOD, sparsity, run.lam, run.form)


@dataclass
class SweepConfig:
    kind: str
    model: str
    domain: str
    out: Path
    sparsities: list[float]
    methods: list[str] = field(default_factory=list)  # sparsity sweep
    blends: list[float] = field(default_factory=lambda: [0.5])  # sparsity sweep: dpruner-obs-blend's weights
    lambdas: list[float] = field(default_factory=list)  # lambda sweep
    forms: list[str] = field(default_factory=lambda: ["anchor"])  # lambda sweep: regularizer forms
    scores: Path | None = None  # dpruner's score folder (sparsity sweep)
    general_importance: Path | None = None  # stage-1 output (lambda sweep)
    train_args: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=lambda: [sys.executable])
    nsamples: int = 128
    seqlen: int = 2048
    sparsity_profile: str = "uniform"  # prune_baseline.py --sparsity-profile (owl: OWL block sparsities)
    split: str = "test"  # which texts are evaluated (SPLITS)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    batch_size: int = 8
    keep_models: bool = False
    fresh: bool = False

    # ---------- checks ----------
    def check(self) -> None:
        """Every input check, before anything is run or written."""
        if self.kind not in KINDS:
            raise DPrunerError(f"unknown sweep {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.domain not in DOMAIN_TASKS:
            raise DPrunerError(f"unknown domain {self.domain!r}; expected one of {', '.join(DOMAIN_TASKS)}")
        if self.split not in SPLITS:
            raise DPrunerError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.split == VALIDATION and load_domain(self.domain).validation is None:
            raise DPrunerError(f"--split validation: domain {self.domain} declares no validation text")
        _check_list(self.sparsities, "--sparsities")
        for value in self.sparsities:
            if not 0.0 <= value < 1.0:
                raise DPrunerError(f"--sparsities: {value:g} is outside [0, 1)")
        self.evaluation.check()
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise DPrunerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.kind == "sparsity":
            self._check_sparsity_sweep()
        else:
            self._check_lambda_sweep()

    def _check_sparsity_sweep(self) -> None:
        _check_list(self.methods, "--methods")
        unknown = [m for m in self.methods if m not in SPARSITY_METHODS]
        if unknown:
            raise DPrunerError(f"--methods: unknown method {unknown[0]!r}; "
                               f"expected some of {', '.join(SPARSITY_METHODS)}")
        readers = [m for m in self.methods if m in SCORE_METHODS]
        if readers and self.scores is None:
            raise DPrunerError(f"method {readers[0]} needs --scores DIR (its importance folder, e.g. OUT/lomo/importance)")
        if self.scores is not None:
            if not readers:
                raise DPrunerError(f"--scores is only read by methods {', '.join(SCORE_METHODS)}, none of which is "
                                   "in --methods")
            ScoreSet.open(self.scores)
        _check_list(self.blends, "--blends")
        outside = [b for b in self.blends if not 0.0 <= b <= 1.0]
        if outside:
            raise DPrunerError(f"--blends: {outside[0]:g} is outside [0, 1]")

    def _check_lambda_sweep(self) -> None:
        from dpruner.config import load_config, parse_override
        from dpruner.importance import REGULARIZERS

        _check_list(self.lambdas, "--lambdas")
        negative = [lam for lam in self.lambdas if lam < 0]
        if negative:
            raise DPrunerError(f"--lambdas: lambda must be >= 0, got {negative[0]:g}")
        _check_list(self.forms, "--forms")
        forms = [form for form in REGULARIZERS if form != NO_REGULARIZER]
        unknown = [form for form in self.forms if form not in forms]
        if unknown:
            raise DPrunerError(f"--forms: unknown regularizer form {unknown[0]!r}; expected some of {', '.join(forms)}")
        if self.general_importance is None:
            raise DPrunerError("the lambda sweep needs --general-importance DIR (stage-1 output)")
        ScoreSet.open(self.general_importance)
        if not self.launcher:
            raise DPrunerError("--launcher is empty")
        for text in self.train_args:
            key = parse_override(text)[0]
            if key in STAGE2_RESERVED:
                raise DPrunerError(f"--train-args sets {key}, which the sweep sets itself "
                                   "(use MODEL, --general-importance, --out, --forms, --lambdas)")
        for run in self.stage2_runs():
            load_config(REPO_ROOT / STAGE2_CONFIGS[self.domain], self.stage2_overrides(run))

    # ---------- what the sweep runs ----------
    def points(self) -> list[Point]:
        """The dense reference first, then every (method or lambda, sparsity) pair in the given order."""
        points = [Point(DENSE, DENSE, 0.0)]
        if self.kind == "sparsity":
            points += [_method_point(m, s, b) for m in self.methods
                       for b in (self.blends if m == BLEND_METHOD else [None]) for s in self.sparsities]
        else:
            points += [_lambda_point(run, s) for run in self.stage2_runs() for s in self.sparsities]
        return points

    def point_of(self, recipe: dict[str, Any]) -> Point | None:
        """The pruned point a recipe file describes (an earlier call's, e.g. of another form or lambda) if this
        call would give it the same recipe, else None: points computed with other settings never mix."""
        try:
            if self.kind == "lambda":
                run = Stage2Run(recipe["stage2"]["regularizer"], float(recipe["stage2"]["lambda"]))
                point = _lambda_point(run, float(recipe["sparsity"]))
            else:
                point = _method_point(recipe["method"], float(recipe["sparsity"]), recipe.get("blend"))
        except (KeyError, TypeError, ValueError):  # the dense row, or a recipe of the other kind of sweep
            return None
        return point if self.recipe(point) == recipe else None

    def stage2_runs(self) -> list[Stage2Run]:
        """lambda = 0 once (no regularizer), then every form at every other lambda."""
        runs = [LAMBDA0_RUN] if 0.0 in self.lambdas else []
        return runs + [Stage2Run(form, lam) for form in self.forms for lam in self.lambdas if lam]

    def recipe(self, point: Point) -> dict[str, Any]:
        """Everything that determines a point's numbers (not how fast they come: batch size, launcher)."""
        recipe: dict[str, Any] = {"model": self.model, "domain": self.domain, "method": point.method,
                                  "evaluation": asdict(self.evaluation)}
        if self.split != "test":  # absent for test, so folders written before --split existed still resume
            recipe["split"] = self.split
        if point.method == DENSE:
            return recipe
        recipe["sparsity"] = point.sparsity
        if point.lam is not None:
            recipe["stage2"] = self.stage2_recipe(point.stage2)
        elif point.method == "dpruner":
            recipe["scores"] = str(self.scores)
        elif point.method != "magnitude":
            recipe["calibration"] = {"nsamples": self.nsamples, "seqlen": self.seqlen}
            if point.method in OBS_SELECTION:
                recipe["scores"] = str(self.scores)
            if point.blend is not None:
                recipe["blend"] = point.blend
        if self.sparsity_profile != "uniform" and point.lam is None:
            recipe["sparsity_profile"] = self.sparsity_profile
            recipe["calibration"] = {"nsamples": self.nsamples, "seqlen": self.seqlen}
        return recipe

    def recipe_path(self, point: Point) -> Path:
        return self.out / "recipes" / f"{point.label}.json"

    def stage2_recipe(self, run: Stage2Run) -> dict[str, Any]:
        return {"regularizer": run.form, "lambda": run.lam, "general_importance": str(self.general_importance),
                "train_args": self.train_args}

    def stage2_dir(self, run: Stage2Run) -> Path:
        return self.out / "lomo" / run.name

    def stage2_recipe_path(self, run: Stage2Run) -> Path:
        """OUT/lomo/<run>.json; not with_suffix, which would map lambda0.0 and lambda0.1 to one file."""
        return self.out / "lomo" / f"{run.name}.json"

    def stage2_overrides(self, run: Stage2Run) -> list[str]:
        return [f"model_name_or_path={self.model}", f"general_importance_dir={self.general_importance}",
                f"output_dir={self.stage2_dir(run)}", *self.train_args, f"regularizer={run.form}",
                f"regularizer_lambda={run.lam}"]

    def prune_command(self, point: Point, target: Path) -> list[str]:
        if point.lam is not None:
            return _cli("save_model.py", self.model, self.stage2_dir(point.stage2) / "importance", target,
                        "--sparsity", point.sparsity)
        selection = OBS_SELECTION.get(point.method)
        command = _cli("prune_baseline.py", "dpruner-obs" if selection else point.method, self.model, target,
                       "--sparsity", point.sparsity)
        if point.method in SCORE_METHODS:
            command += ["--scores", str(self.scores)]
        if selection:
            command += ["--selection", selection]
        if point.blend is not None:
            command += ["--blend", repr(point.blend)]
        if self.sparsity_profile != "uniform":  # OWL measures outliers on calibration data, for every method
            command += ["--sparsity-profile", self.sparsity_profile]
        elif point.method in ("dpruner", "magnitude"):
            return command
        command += ["--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen)]
        if point.method in DOMAIN_CALIBRATION_METHODS:
            return [*command, "--calibration", "mix", "--domain", self.domain]
        return command

    def tasks(self) -> list[str]:
        if self.split == VALIDATION:
            return [load_domain(self.domain).result_name(VALIDATION), GENERAL_VALIDATION_TASK]
        return [*DOMAIN_TASKS[self.domain], WIKITEXT_TASK]

    def columns(self) -> list[tables.Column]:
        return tables.validation_columns(self.domain) if self.split == VALIDATION else tables.domain_columns(self.domain)

    def result_path(self, point: Point, task: str) -> Path:
        """OUT/eval/<point>/<task>.json: the layout dpruner.tables and make_tables.py read."""
        return self.out / "eval" / point.label / f"{task}.json"

    def finished(self, point: Point) -> bool:
        return all(self.result_path(point, task).is_file() for task in self.tasks())


def _check_list(values: Sequence[Any], option: str) -> None:
    if not values:
        raise DPrunerError(f"{option} is empty")
    if len(set(values)) != len(values):
        raise DPrunerError(f"{option} lists a value twice")


def _cli(script: str, *args: Any) -> list[str]:
    return [sys.executable, str(CODE_DIR / script), *map(str, args)]


def parse_list(text: str, option: str, number: bool = False) -> list[Any]:
    """A comma-separated command-line list (numbers when `number`)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not number:
        return items
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise DPrunerError(f"{option}: {item!r} is not a number") from None
        if not math.isfinite(value):
            raise DPrunerError(f"{option}: {item!r} is not a finite number")
        values.append(value)
    return values


# ---------- the output folder ----------
def _prepare(config: SweepConfig, points: Sequence[Point]) -> None:
    """Refuse a foreign folder or another kind of sweep, apply --fresh, refuse changed recipes."""
    out, marker = config.out, config.out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise DPrunerError(f"--out {out} is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise DPrunerError(f"--out {out} is not empty and holds no {SWEEP_FILE}; choose another folder")
    if config.fresh and marker.is_file():
        shutil.rmtree(out)
    elif marker.is_file():
        kind = read_json(marker).get("sweep")
        if kind != config.kind:
            raise DPrunerError(f"--out {out} holds a {kind} sweep, not a {config.kind} sweep; choose another folder")
    for what, (path, recipe) in _recipes(config, points).items():
        if path.is_file():
            _same_recipe(out, what, read_json(path), recipe)
    write_json(marker, {"format": SWEEP_FORMAT, "sweep": config.kind, "points": [p.label for p in points],
                        "command": shlex.join(sys.argv)})


def _recipes(config: SweepConfig, points: Sequence[Point]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{what: (recipe file, recipe)} for every point and every stage-2 run of the sweep."""
    recipes = {f"point {p.label}": (config.recipe_path(p), config.recipe(p)) for p in points}
    for run in config.stage2_runs() if config.kind == "lambda" else ():
        recipes[f"stage 2 of {run.name}"] = (config.stage2_recipe_path(run), config.stage2_recipe(run))
    return recipes


def _same_recipe(out: Path, what: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    old, new = _flatten(old), _flatten(new)
    differ = [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    if differ:
        key = differ[0]
        raise DPrunerError(f"{out}: {what} was computed with other settings ({key}: {old.get(key)!r} -> "
                           f"{new.get(key)!r}); pass --fresh to start over or choose another --out")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------- running ----------
def _run(config: SweepConfig, label: str, step: str, command: list[str]) -> None:
    """One CLI as a subprocess, its output appended to OUT/logs/<label>.log; a failure names its error line."""
    log = config.out / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tqdm.write(f"{label}: {step}")
    with open(log, "a") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    if code:
        lines = log.read_text().rsplit("\n$ ", 1)[-1].splitlines()[1:]
        errors = [line for line in lines if line.startswith("error:")]
        reason = (errors or [line for line in lines if line.strip()] or ["no output"])[-1]
        raise DPrunerError(f"{label}: {step} failed (exit {code}): {reason}; full output in {log}")


def _stage2(config: SweepConfig, run: Stage2Run) -> None:
    """This stage-2 run, unless finished; its fine-tuned weights are dropped unless --keep-models."""
    folder = config.stage2_dir(run)
    if _stage2_complete(config, run):
        return
    write_json(config.stage2_recipe_path(run), config.stage2_recipe(run))
    command = [*config.launcher, str(CODE_DIR / "src" / "train_lomo.py"),
               str(REPO_ROOT / STAGE2_CONFIGS[config.domain]), *config.stage2_overrides(run)]
    _run(config, run.name, "stage 2 (LOMO fine-tuning, dual importance)", command)
    if not config.keep_models:
        shutil.rmtree(folder / "epochs", ignore_errors=True)


def _run_point(config: SweepConfig, point: Point) -> None:
    """Prune (unless the model is there), evaluate what is missing, keep the report, drop the model."""
    write_json(config.recipe_path(point), config.recipe(point))
    target = config.out / "models" / point.label
    if point.method == DENSE:
        target = Path(config.model)
    elif not (target / REPORT_NAME).is_file():
        if point.lam is not None:
            _stage2(config, point.stage2)
        _run(config, point.label, "prune", config.prune_command(point, target))
    for task in config.tasks():
        result = config.result_path(point, task)
        if not result.is_file():
            _run(config, point.label, f"evaluate {task}",
                 _cli(SCRIPTS[task], config.model, target, "--batch-size", config.batch_size, "--out", result,
                      *config.evaluation.task_args(task)))
    if point.method != DENSE:
        with atomic_path(config.out / "reports" / f"{point.label}.json") as tmp:
            shutil.copyfile(target / REPORT_NAME, tmp)
        if not config.keep_models:
            shutil.rmtree(target)


def run_sweep(config: SweepConfig) -> list[dict[str, Any]]:
    """Run every unfinished point; results.csv, table.md and pareto.png are rewritten after each."""
    config.check()
    points = config.points()
    _prepare(config, points)
    earlier, other_settings = earlier_points(config, points)
    if earlier:
        tqdm.write(f"results also cover {len(earlier)} finished points of earlier calls on {config.out}")
    if other_settings:
        tqdm.write(f"results leave out {len(other_settings)} earlier points of {config.out} computed with other "
                   f"settings (e.g. {other_settings[0]})")
    bar = tqdm(points, desc=f"{config.kind} sweep", unit="point")
    for point in bar:
        bar.set_postfix_str(point.label)
        if config.finished(point):
            tqdm.write(f"[skip] {point.label}: already evaluated")
        else:
            _run_point(config, point)
        update_lambda_jaccards(config, points)
        rows = write_results(config, [*points, *earlier])
    bar.close()
    return rows


def earlier_points(config: SweepConfig, points: Sequence[Point]) -> tuple[list[Point], list[str]]:
    """(finished points of earlier calls on this folder that this call would compute the same way, labels of
    the others), so that forms swept in separate calls, each on its own lambda grid, share one results.csv,
    table.md and trade-off plot, and points of other settings are named rather than mixed in."""
    known = {point.label for point in points}
    same: list[Point] = []
    other: list[str] = []
    for path in sorted((config.out / "recipes").glob("*.json")):
        if path.stem in known:
            continue
        point = config.point_of(read_json(path))
        if point is None or point.label != path.stem:
            other.append(path.stem)
        elif config.finished(point):
            same.append(point)
    same.sort(key=lambda p: (p.method, p.form, p.lam or 0.0, p.blend or 0.0, p.sparsity))
    return same, other


# ---------- results ----------
def _key(title: str) -> str:
    """A table column title as a CSV column name: "CaseHOLD acc" -> casehold_acc."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def headline_columns(config: SweepConfig) -> tuple[tables.Column, tables.Column]:
    """The plotted metrics: the domain perplexity, then the choice accuracy (test) or WikiText-2
    validation perplexity (validation): the first column of each of the sweep's first two tasks."""
    columns = config.columns()
    first, second = config.tasks()[:2]
    return next(c for c in columns if c.task == first), next(c for c in columns if c.task == second)


def collect(config: SweepConfig, points: Sequence[Point]) -> tuple[list[dict[str, Any]], tables.Table | None]:
    """One row per finished point (in sweep order), with the sparsity its pruning report measured."""
    finished = [p for p in points if config.finished(p)]
    if not finished:
        return [], None
    table = tables.build_table(tables.load_results(config.out / "eval"), config.domain, [p.label for p in finished],
                               columns=config.columns())
    rows = []
    for point, (label, cells, sparsity) in zip(finished, table.rows):
        row: dict[str, Any] = {"sweep": config.kind, "label": label, "method": point.method,
                               "form": "" if point.lam is None else point.form,
                               "lambda": "" if point.lam is None else point.lam, "sparsity": point.sparsity,
                               "projection_sparsity": sparsity.get("projection_sparsity"),
                               "overall_sparsity": sparsity.get("overall_sparsity")}
        for column in table.columns:
            cell = cells[column.title]
            row[_key(column.title)] = cell.value
            row[_key(column.title) + "_ci95_low"] = cell.interval.low if cell.interval else None
            row[_key(column.title) + "_ci95_high"] = cell.interval.high if cell.interval else None
        if config.kind == "lambda":
            jaccard = _jaccard_path(config, point)
            row[JACCARD_COLUMN] = read_json(jaccard)["jaccard"] if jaccard.is_file() else None
        rows.append(row)
    return rows, table


def write_results(config: SweepConfig, points: Sequence[Point]) -> list[dict[str, Any]]:
    rows, table = collect(config, points)
    if not rows:
        return rows
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(config.out / RESULTS_CSV) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(config.out / TABLE_MD) as tmp:
        tmp.write_text(tables.to_markdown(table))
    with atomic_path(config.out / PLOT) as tmp:
        plot(rows, tmp, config)
    if config.kind == "lambda":
        with atomic_path(config.out / TRADEOFF_PLOT) as tmp:
            plot_tradeoff(rows, tmp, config)
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (sparsity, perplexity) points no other point beats: none is at least as sparse with
    lower perplexity, or sparser with equal perplexity. Sorted by sparsity."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: Sequence[dict[str, Any]], path: Path, config: SweepConfig) -> None:
    """Domain ppl (log) and accuracy (or general ppl) against sparsity, one line per method / lambda,
    dense dashed, and the Pareto front of (high sparsity, low ppl) circled."""
    plt = _pyplot()
    domain, kind = config.domain, config.kind
    ppl_column, acc_column = headline_columns(config)
    ppl_key, acc_key = _key(ppl_column.title), _key(acc_column.title)
    dense = next((r for r in rows if r["method"] == DENSE), None)
    pruned = [r for r in rows if r["method"] != DENSE]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in pruned:
        groups.setdefault(row["method"] if kind == "sparsity" else f"{row['form']} λ = {row['lambda']!r}", []).append(row)

    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, key, title in ((ax_ppl, ppl_key, ppl_column.title), (ax_acc, acc_key, acc_column.title)):
        for index, (name, members) in enumerate(groups.items()):
            members = sorted((r for r in members if _finite(r[key])), key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] for r in members], [r[key] for r in members], marker="o", color=f"C{index % 10}",
                    label=name)
        if dense is not None and _finite(dense[key]):
            ax.axhline(dense[key], color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set(xlabel="sparsity of the 7 projections", ylabel=title)
        ax.grid(alpha=0.3)
    candidates = [r for r in rows if _finite(r[ppl_key])]
    front = [candidates[i] for i in pareto_front([(r["sparsity"], r[ppl_key]) for r in candidates])]
    ax_ppl.plot([r["sparsity"] for r in front], [r[ppl_key] for r in front], linestyle=":", color="black",
                marker="o", markersize=11, markerfacecolor="none", label="Pareto front")
    ax_ppl.set_yscale("log")
    ax_ppl.set_title(f"{ppl_column.title} (lower is better)")
    ax_acc.set_title(f"{acc_column.title} ({'lower' if acc_column.lower_is_better else 'higher'} is better)")
    ax_ppl.legend(fontsize=8)
    fig.suptitle(f"{domain}: {kind} sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def tradeoff_curves(rows: Sequence[dict[str, Any]], forms: Sequence[str]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """{(form, sparsity): its rows by increasing lambda}; every curve starts at the shared lambda = 0 row."""
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != DENSE})
    return {(form, sparsity): sorted((r for r in rows if r["method"] != DENSE and r["sparsity"] == sparsity
                                      and r["form"] in (form, NO_REGULARIZER)), key=lambda r: r["lambda"])
            for form in forms for sparsity in sparsities}


def curve_forms(rows: Sequence[dict[str, Any]], config: SweepConfig) -> list[str]:
    """This call's forms, then those of earlier calls' rows: one trade-off curve each."""
    return list(dict.fromkeys([*config.forms, *(r["form"] for r in rows
                                                if r["method"] != DENSE and r["form"] != NO_REGULARIZER)]))


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: Path, config: SweepConfig) -> None:
    """The lambda sweep's generality / specificity trade-off: domain ppl against general ppl, one curve per
    (form, sparsity) through its lambdas from the shared lambda = 0, with 95 % intervals as error bars, and
    each mask's Jaccard against lambda = 0."""
    plt = _pyplot()
    domain_column, _ = headline_columns(config)
    general_column = next(c for c in config.columns() if c.task in (WIKITEXT_TASK, GENERAL_VALIDATION_TASK))
    x_key, y_key = _key(general_column.title), _key(domain_column.title)
    fig, (ax, ax_jaccard) = plt.subplots(1, 2, figsize=(11, 4.5))
    pruned = [r for r in rows if r["method"] != DENSE and _finite(r[x_key]) and _finite(r[y_key])]
    for index, ((form, sparsity), members) in enumerate(tradeoff_curves(pruned, curve_forms(pruned, config)).items()):
        xs, ys = [r[x_key] for r in members], [r[y_key] for r in members]
        xerr = [[x - (r[x_key + "_ci95_low"] or x) for x, r in zip(xs, members)],
                [(r[x_key + "_ci95_high"] or x) - x for x, r in zip(xs, members)]]
        yerr = [[y - (r[y_key + "_ci95_low"] or y) for y, r in zip(ys, members)],
                [(r[y_key + "_ci95_high"] or y) - y for y, r in zip(ys, members)]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", color=f"C{index % 10}", capsize=3,
                    label=f"{form}, sparsity {sparsity:g}")
        for x, y, row in zip(xs, ys, members):
            ax.annotate(f"λ={row['lambda']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        with_jaccard = [r for r in members if _finite(r.get(JACCARD_COLUMN))]
        ax_jaccard.plot([r["lambda"] for r in with_jaccard], [r[JACCARD_COLUMN] for r in with_jaccard], marker="o",
                        color=f"C{index % 10}", label=f"{form}, sparsity {sparsity:g}")
    dense = next((r for r in rows if r["method"] == DENSE), None)
    if dense is not None and _finite(dense[x_key]) and _finite(dense[y_key]):
        ax.plot([dense[x_key]], [dense[y_key]], marker="*", markersize=12, color="grey", linestyle="", label="dense")
    ax.set(xlabel=f"{general_column.title} (lower = more general ability kept)",
           ylabel=f"{domain_column.title} (lower = more domain ability kept)")
    ax.set_title("trade-off (95 % intervals)")
    ax_jaccard.set_xscale("symlog", linthresh=min((r["lambda"] for r in pruned if r["lambda"]), default=1.0))
    ax_jaccard.set(xlabel="λ", ylabel="Jaccard of pruned weights vs λ = 0", title="how much λ changes the mask")
    for axis in (ax, ax_jaccard):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a partial sweep's plot may have no curve yet
            axis.legend(fontsize=8)
    fig.suptitle(f"{config.domain}: lambda sweep on {config.split} text")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ---------- how far lambda moves the mask ----------
def _jaccard_path(config: SweepConfig, point: Point) -> Path:
    return config.out / "jaccard" / f"{point.label}.json"


def _stage2_complete(config: SweepConfig, run: Stage2Run) -> bool:
    state = config.stage2_dir(run) / STATE_FILE
    return state.is_file() and bool(read_json(state).get("complete"))


def update_lambda_jaccards(config: SweepConfig, points: Sequence[Point]) -> None:
    """For every lambda point whose stage 2 and lambda = 0's are complete: the pooled Jaccard of its pruned
    positions against lambda = 0's at the same sparsity, from the two score folders (the masks
    save_model.py derives, one layer at a time), written once to OUT/jaccard/<point>.json."""
    if config.kind != "lambda" or 0.0 not in config.lambdas or not _stage2_complete(config, LAMBDA0_RUN):
        return
    from dpruner.analysis import ALL, MaskOptions, ScoreMasks, count_masks, jaccard_rows

    for point in points:
        path = _jaccard_path(config, point)
        if point.lam is None or path.is_file() or not _stage2_complete(config, point.stage2):
            continue
        if point.lam == 0.0:
            write_json(path, {"lambda": 0.0, "sparsity": point.sparsity, "against": 0.0, "jaccard": 1.0})
            continue
        options = MaskOptions(sparsity=point.sparsity, scope="matrix")  # save_model.py's per-matrix masks
        sources = [ScoreMasks(run.name, config.stage2_dir(run) / "importance", options)
                   for run in (LAMBDA0_RUN, point.stage2)]
        pooled = next(r for r in jaccard_rows(count_masks(sources)) if r["layer"] == ALL and r["module"] == ALL)
        write_json(path, {"form": point.form, "lambda": point.lam, "sparsity": point.sparsity, "against": 0.0,
                          "jaccard": pooled["jaccard"], "random_jaccard": pooled["random_jaccard"]})

"""Stage-2 configuration: one flat YAML file, validated key by key, overridable from the CLI.

Keys of the original `args_lomo.yaml` that still mean something keep their names. Keys that no longer
do anything (they configured HF Trainer features the original never used) are accepted with a
warning, so the original file loads; unknown or misspelt keys are errors. Relative paths resolve
against the repository root first, then the config file's folder — never the current directory.
"""

from __future__ import annotations

import difflib
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dpruner.data.spec import load_domain, shipped_domains
from dpruner.errors import DPrunerError
from dpruner.importance import ANCHOR_STEPS, DEFAULT_LAMBDAS, GENERAL_NORMS, REGULARIZERS, RENAMED_REGULARIZERS
from dpruner.paths import REPO_ROOT
from dpruner.validate import load_yaml

# Keys of the original config that configure nothing here (HF Trainer leftovers, LOMO leftovers,
# `llama_type` whose shapes we read from the model, the tokenization cache keys).
OBSOLETE_KEYS = frozenset({
    "dataset_name", "refresh", "data_tag", "train_on_inputs", "tag", "do_train", "do_eval",
    "evaluation_strategy", "per_device_eval_batch_size", "remove_unused_columns", "load_best_model_at_end",
    "metric_for_best_model", "group_by_length", "dataloader_pin_memory", "predict_with_generate", "llama_type",
    "report_to", "save_total_limit",
})

DOMAINS = shipped_domains()  # config/domains/*.yaml; `domain:` also takes a domain YAML path


# Keys whose values must come from a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler_type": ("linear", "constant"),
    "save_strategy": ("epoch", "no"),
    "regularizer": REGULARIZERS,
    "general_importance_norm": GENERAL_NORMS,
    "anchor_step": ANCHOR_STEPS,
    "importance_formula": ("paper", "upstream"),
    "importance_accumulate": ("every_step", "upstream"),
    "general_importance_dtype": ("bfloat16", "float32"),
    "importance_offload": ("none", "cpu"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "domain_mixing": ("constant", "dro"),
    "dro_loss": ("train", "validation"),
}


@dataclass
class TrainConfig:
    """All settings of stage 2. Defaults follow the paper where it and the original code disagree."""

    # --- what to train (original keys) ---
    model_name_or_path: str = "smollm2-135m"
    domain: str = "legal"  # original: legal | medical; ours also: a domain YAML path (docs/DOMAINS.md)
    general_importance_dir: str = ""  # stage-1 output (original key; no trailing slash needed)
    output_dir: str = "outputs/lomo_legal"
    overwrite_output_dir: bool = False  # the original's true silently replaced outputs; we refuse by default
    deepspeed: str | None = None  # DeepSpeed JSON config (original key); null = plain PyTorch
    # --- optimisation (original keys and values) ---
    per_device_train_batch_size: int = 8  # original args_lomo.yaml
    learning_rate: float = 0.03  # original args_lomo.yaml (LOMO's SGD learning rate)
    weight_decay: float = 0.0  # original args_lomo.yaml
    num_train_epochs: int = 1  # paper summary: one epoch; the original config ran 5
    lr_scheduler_type: str = "linear"  # original: linear decay after warmup
    warmup: float = 0.1  # original: fraction of steps with linear warmup
    clip_grad_norm: float | None = 1.0  # original: two-pass global-norm clipping at 1.0
    clip_grad_value: float | None = None  # original MyTrainingArguments default (off)
    seed: int = 42  # original args_lomo.yaml
    gradient_checkpointing: bool = True  # original args_lomo.yaml
    loss_chunk_tokens: int | None = 256  # ours: LM head + loss per 256 tokens (same loss, less memory)
    data_max_length: int | None = None  # original passed 1024 but never truncated; null = no truncation
    save_strategy: str = "epoch"  # original: save every epoch ("no" keeps only the final importance)
    # --- domain data (counts of the original train_lomo.py) ---
    data_dir: str | None = None  # prepared data root (default legal_pruning_data/data)
    casehold_examples: int | None = 500  # legal: first 500 CaseHOLD train rows
    billsum_examples: int | None = 500  # legal: first 500 BillSum rows (we ship only 200, see DEVIATIONS)
    pubmedqa_examples: int | None = None  # medical: all PQA-L train rows
    pubmedqa_artificial_examples: int | None = 150  # medical: first 150 PQA-A rows (user file)
    pubmedqa_artificial_file: str | None = None  # PQA-A `ori_pqaa.json` (not redistributable here)
    mednli_examples: int | None = 200  # medical: first 200 MedNLI rows (user file)
    mednli_file: str | None = None  # MedNLI `mli_train_v1.jsonl` (credentialed; user-supplied)
    hqs_examples: int | None = 200  # medical: first 200 HQS rows
    max_steps: int | None = None  # stop after this many optimizer steps (quick runs, benchmarks)
    # --- several domains at once (ours, after DRPruning; dpruner/mixing.py, dpruner/dro.py, docs/CONFIG.md) ---
    domains: list[str] | None = None  # null = the single `domain`; else these domains, batches drawn by proportion
    domain_proportions: list[float] | None = None  # initial sampling proportions (null = equal); normalised
    domain_mixing: str = "constant"  # constant | dro: DRPruning's update of the proportions
    domain_eval_examples: int = 16  # ours: per domain, held out of training for the reference and the result
    dro_update_interval: int = 10  # ours: optimizer steps between DRO updates
    dro_loss: str = "train"  # train: EMA of the training loss | validation: the held-out loss (DRPruning use_eval)
    dro_reference_losses: list[float] | None = None  # null = the dense model's held-out loss per domain
    dro_rho: float = 0.05  # DRPruningCallback rho (radius of the chi-square ball)
    dro_ema: float = 0.1  # DRPruningCallback ema (weight of the newest loss)
    dro_min_prob: float = 0.2  # DRPruningCallback min_prob (lower clamp of q/p)
    dro_smoothing: float | None = None  # DRPruning dynamic_proportion: centre p <- (1-s) p + s q with s=0.1; null = off
    # --- D-Pruner (names ours; values from the paper / original code) ---
    # anchor: exact gradient of lambda*sum G(W-W0)^2 | grad_penalty: exact gradient of lambda*eta^2*sum G g^2
    # (Hessian-vector product) | squared_grad: +2*lambda*eta^2*G*g^2 (not a gradient; formerly "paper")
    # | upstream: the original's code | none. See dpruner.importance and docs/DEVIATIONS.md.
    regularizer: str = "anchor"
    # lambda; null = the form's default (importance.DEFAULT_LAMBDAS: 100 for anchor, chosen on validation
    # text; the original lomo.py's hard-coded 0.1 for the others), resolved by validate()
    regularizer_lambda: float | None = None
    general_importance_norm: str = "auto"  # ours: matrix_mean (G / mean per matrix: scale-free lambda) | none; auto = none for upstream
    anchor_step: str = "proximal"  # ours: proximal (implicit step, stable for any G) | explicit (plain SGD on the term)
    importance_formula: str = "paper"  # paper: |g*w + (g*w)^2/2| | upstream: |g*w + (g*w)^2/2000 + w^3|
    importance_accumulate: str = "every_step"  # every_step | upstream: norm pass only, from step 2
    loss_scale: float | None = None  # upstream emulation: constant S multiplying g in the formulas (2^16 in fp16)
    upstream_regularizer_divisor: float = 1000.0  # extra divisor of the original's regularizer
    upstream_importance_divisor: float = 2000.0  # quadratic-term divisor of the original's score
    general_importance_dtype: str = "bfloat16"  # G held in bf16 to save memory (fp32 on disk)
    importance_offload: str = "none"  # ours: none (G, W0, scores on the device) | cpu (pinned CPU memory, one-GPU runs)
    # --- numerics and logging ---
    dtype: str = "auto"  # auto: fp16 on CUDA (original, with loss scaling), fp32 on CPU
    initial_loss_scale: float = 65536.0  # original DynamicLossScaler init (fp16 only)
    logging_steps: int = 1

    config_path: str | None = field(default=None, repr=False, compare=False)

    def validate(self) -> TrainConfig:
        where = self.config_path or "config"
        for key, value in self.to_dict().items():  # also for configs built in code, not read from YAML
            if isinstance(value, float) and not math.isfinite(value):
                raise DPrunerError(f"{where}: {key}={value} must be a finite number")
        if self.regularizer in RENAMED_REGULARIZERS:
            raise DPrunerError(f"{where}: regularizer={self.regularizer!r} was renamed "
                               f"{RENAMED_REGULARIZERS[self.regularizer]!r} (it is not the gradient of the paper's "
                               "penalty; docs/DEVIATIONS.md); the exact forms are 'anchor' and 'grad_penalty'")
        if self.domain not in DOMAINS and not Path(self.domain).is_file():
            raise DPrunerError(f"{where}: domain={self.domain!r}; expected one of {', '.join(DOMAINS)}, "
                               "or a domain YAML file")
        load_domain(self.domain)  # a spec error names the spec file and key
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise DPrunerError(f"{where}: {key}={getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        positive = ("per_device_train_batch_size", "num_train_epochs", "logging_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise DPrunerError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.regularizer_lambda is None:  # recorded resolved, so config.yaml says which lambda ran
            self.regularizer_lambda = DEFAULT_LAMBDAS[self.regularizer]
        ranges = {"learning_rate": (0, None), "weight_decay": (0, None), "warmup": (0, 1),
                  "regularizer_lambda": (0, None), "upstream_regularizer_divisor": (0, None),
                  "upstream_importance_divisor": (0, None), "initial_loss_scale": (1, None)}
        for key, (low, high) in ranges.items():
            value = getattr(self, key)
            if value < low or (high is not None and value >= high):
                bound = f"[{low}, {high})" if high is not None else f">= {low}"
                raise DPrunerError(f"{where}: {key}={value} out of range; expected {bound}")
        for key in ("clip_grad_norm", "clip_grad_value", "loss_scale", "data_max_length", "max_steps",
                    "loss_chunk_tokens", "casehold_examples", "billsum_examples", "pubmedqa_examples",
                    "pubmedqa_artificial_examples", "mednli_examples", "hqs_examples"):
            value = getattr(self, key)
            if value is not None and value <= 0 and not key.endswith("_examples"):
                raise DPrunerError(f"{where}: {key} must be positive or null, got {value}")
            if value is not None and value < 0:
                raise DPrunerError(f"{where}: {key} must be >= 0 or null, got {value}")
        self._validate_domains(where)
        if self.importance_accumulate == "upstream" and not self.clip_grad_norm:
            raise DPrunerError(f"{where}: importance_accumulate=upstream needs clip_grad_norm "
                               "(the original accumulates in the norm pass of two-pass clipping)")
        if self.regularizer == "grad_penalty" and self.dtype == "float16":
            raise DPrunerError(f"{where}: regularizer=grad_penalty needs dtype float32 or bfloat16 "
                               "(its double backward is not loss-scaled)")
        if self.regularizer == "upstream" and self.general_importance_norm == "matrix_mean":
            raise DPrunerError(f"{where}: regularizer=upstream reproduces the original, which uses raw G; "
                               "set general_importance_norm: none (or auto)")
        if self.regularizer != "none" and not self.general_importance_dir:
            raise DPrunerError(f"{where}: general_importance_dir is empty; set it to the stage-1 output "
                               "(or regularizer: none)")
        if self.general_importance_dir and not Path(self.general_importance_dir).is_dir():
            raise DPrunerError(f"{where}: general_importance_dir {self.general_importance_dir} does not exist "
                               "(run stage 1: python code/general.py MODEL c4)")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise DPrunerError(f"{where}: deepspeed config {self.deepspeed} does not exist")
        for key in ("mednli_file", "pubmedqa_artificial_file"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise DPrunerError(f"{where}: {key} {value} does not exist")
        return self

    def _validate_domains(self, where: str) -> None:
        """The multi-domain keys (dpruner/mixing.py)."""
        if self.domains is not None:
            if not self.domains or len(set(self.domains)) != len(self.domains):
                raise DPrunerError(f"{where}: domains={self.domains}; expected a non-empty list without repeats")
            for name in self.domains:
                if name not in DOMAINS and not Path(name).is_file():
                    raise DPrunerError(f"{where}: domains: {name!r}; expected names from {', '.join(DOMAINS)} "
                                       "or domain YAML paths")
                load_domain(name)  # a spec error names the spec file and key
        count = len(self.domains or [self.domain])
        for key in ("domain_proportions", "dro_reference_losses"):
            values = getattr(self, key)
            if values is not None and len(values) != count:
                raise DPrunerError(f"{where}: {key} has {len(values)} values for {count} domain(s)")
        if self.domain_proportions is not None and not all(math.isfinite(v) and v > 0 for v in self.domain_proportions):
            raise DPrunerError(f"{where}: domain_proportions={self.domain_proportions}; expected positive numbers")
        if self.dro_reference_losses is not None and not all(map(math.isfinite, self.dro_reference_losses)):
            raise DPrunerError(f"{where}: dro_reference_losses={self.dro_reference_losses}; expected finite numbers")
        if self.domains is None and (self.domain_mixing != "constant" or self.domain_proportions is not None):
            raise DPrunerError(f"{where}: domain_mixing / domain_proportions need `domains: [...]`")
        checks = {"domain_eval_examples": self.domain_eval_examples >= 0,
                  "dro_update_interval": self.dro_update_interval >= 1, "dro_rho": self.dro_rho >= 0,
                  "dro_ema": 0 < self.dro_ema <= 1, "dro_min_prob": 0 <= self.dro_min_prob <= 1,
                  "dro_smoothing": self.dro_smoothing is None or 0 < self.dro_smoothing <= 1}
        for key, ok in checks.items():
            value = getattr(self, key)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise DPrunerError(f"{where}: {key}={value} out of range (see docs/CONFIG.md)")
        if self.domain_mixing == "dro" and self.dro_loss == "validation" and not self.domain_eval_examples:
            raise DPrunerError(f"{where}: dro_loss=validation needs domain_eval_examples > 0")
        if self.domain_mixing == "dro" and not self.dro_reference_losses and not self.domain_eval_examples:
            raise DPrunerError(f"{where}: domain_mixing=dro needs dro_reference_losses or domain_eval_examples > 0 "
                               "(the dense model's held-out loss is the default reference)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config_path"}


PATH_KEYS = ("general_importance_dir", "output_dir", "deepspeed", "data_dir", "mednli_file",
             "pubmedqa_artificial_file")


def _is_spec_path(value: str) -> bool:
    return Path(str(value)).suffix in (".yaml", ".yml")


def _resolve_path(value: str, config_dir: Path) -> str:
    """Absolute paths stay; relative ones resolve against the repo root, else the config's folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    for base in (REPO_ROOT, config_dir):
        if (base / path).exists():
            return str((base / path).resolve())
    return str((REPO_ROOT / path).resolve())


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against the dataclass annotation (int/float/str/bool, optional or not)."""
    origin_args = get_args(hint)
    optional = type(None) in origin_args
    base = next((a for a in origin_args if a is not type(None)), hint) if get_origin(hint) is not None else hint
    if value is None:
        if optional:
            return None
        raise DPrunerError(f"{where}: {key} must not be null")
    if get_origin(base) is list:
        if not isinstance(value, list):
            raise DPrunerError(f"{where}: {key}={value!r} must be a list, e.g. [a, b]")
        (item,) = get_args(base)
        return [_coerce(f"{key}[{index}]", entry, item, where) for index, entry in enumerate(value)]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise DPrunerError(f"{where}: {key}={value!r} must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise DPrunerError(f"{where}: {key}={value!r} must be an integer")
    if base is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise DPrunerError(f"{where}: {key}={value!r} must be a finite number")
        return number
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise DPrunerError(f"{where}: {key}={value!r} must be a string")
    raise TypeError(f"unsupported annotation for {key}: {hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line, value parsed as YAML (so 0.1, true, null work)."""
    if "=" not in text:
        raise DPrunerError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        return key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key, raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read, check and complete a stage-2 YAML config; `overrides` are `key=value` strings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DPrunerError(f"config file {path} does not exist")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise DPrunerError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        raw[key] = value
    hints = get_type_hints(TrainConfig)
    known = {f.name for f in fields(TrainConfig)} - {"config_path"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in OBSOLETE_KEYS:
            print(f"warning: {path}: key {key!r} has no effect in this reimplementation; ignored", file=sys.stderr)
            continue
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DPrunerError(f"{path}: unknown key {key!r}{hint}")
        values[key] = _coerce(key, value, hints[key], str(path))
    for key in PATH_KEYS:
        if values.get(key):
            values[key] = _resolve_path(values[key], path.resolve().parent)
    if _is_spec_path(values.get("domain", "")):  # a domain spec path, not a shipped name
        values["domain"] = _resolve_path(values["domain"], path.resolve().parent)
    if values.get("domains"):
        values["domains"] = [_resolve_path(d, path.resolve().parent) if _is_spec_path(d) else d
                             for d in values["domains"]]
    config = TrainConfig(**values)
    config.config_path = str(path)
    return config.validate()


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)



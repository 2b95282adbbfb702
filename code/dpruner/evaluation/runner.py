"""What the eight evaluation CLIs share: options, input checks, model loading, the result files.

A CLI describes its task (a `Task`: which family of evaluator, how to load its data, the original's
defaults) and calls `main`. The order makes a bad input cheap: arguments, model paths and configs,
and the data rows are checked before any weights are loaded, and results are written atomically at
the end (per-example JSONL first, then the result JSON), so a failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpruner import cli
from dpruner.checkpoint import PICKLE_SUFFIXES, pickle_refusal
from dpruner.data.eval_sets import EvalSet, task_set
from dpruner.data.spec import VALIDATION, DomainSpec, load_domain
from dpruner.errors import DPrunerError
from dpruner.evaluation.choice import score_choices
from dpruner.evaluation.generation import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DecodingSettings, generate_first_lines
from dpruner.evaluation.metrics import accuracy, macro_f1, rouge
from dpruner.evaluation.perplexity import sliding_windows, window_perplexity
from dpruner.export import REPORT_NAME, sparsity_report, versions
from dpruner.guard import Output, model_input, model_inputs, protect
from dpruner.io import read_json, write_json, write_jsonl
from dpruner.models import EMBEDDED_MODEL, load_model, load_tokenizer, resolve_model

FAMILIES = ("perplexity", "choice", "generation")
# Config fields that must agree between the base model (tokenizer) and the evaluated model.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
DEFAULT_OUT_DIR = "outputs/eval"


@dataclass(frozen=True)
class Task:
    """One evaluation CLI. `limit` is the original's row count (the default --limit, None = all);
    `stride` None means non-overlapping full windows (SparseGPT protocol, no --stride option)."""

    name: str
    family: str
    load: Callable[[argparse.Namespace], EvalSet]
    limit: int | None
    batch_size: int
    max_length: int | None = None
    stride: int | None = None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


# Evaluator family of a domain spec's task type.
FAMILY_OF_TYPE = {"choice": "choice", "generation": "generation"}


def spec_task(domain: str | DomainSpec, task: str, batch_size: int,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
              load: Callable[[argparse.Namespace], EvalSet] | None = None) -> Task:
    """The `Task` of one evaluation of a domain spec (a shipped name, a YAML path or a loaded spec):
    its data, row count, and for perplexity its window and stride. `load` replaces the spec's loader
    (medical perplexity with --text-file); a positional `file` argument replaces the task's file."""
    spec = domain if isinstance(domain, DomainSpec) else load_domain(domain)
    text = spec.perplexity_text(task)
    if task not in spec.task_names() and text is None:
        known = [*spec.task_names(), *([VALIDATION] if spec.validation else [])]
        raise DPrunerError(f"domain {spec.name} ({spec.path}) has no task {task!r}; expected one of {', '.join(known)}")
    load = load or (lambda args: task_set(spec, task, args.data_dir, args.limit, getattr(args, "file", None)))
    if text is not None:
        return Task(spec.result_name(task), "perplexity", load, limit=text.source.count, batch_size=batch_size,
                    max_length=text.window, stride=text.stride, add_arguments=add_arguments)
    definition = spec.tasks[task]
    return Task(spec.result_name(task), FAMILY_OF_TYPE[definition.type], load, limit=definition.source.count,
                batch_size=batch_size, add_arguments=add_arguments)


@dataclass
class Loaded:
    tokenizer: Any
    model: nn.Module
    paths: dict[str, Any]
    sparsity: dict[str, Any]


def build_parser(task: Task, description: str, prog: str) -> argparse.ArgumentParser:
    parser = cli.make_parser(description, prog=prog)
    parser.add_argument("base_model", help=f"model giving the tokenizer (the original's LLAMA2_DIR): a folder, hub id, "
                                           f"or '{EMBEDDED_MODEL}'")
    parser.add_argument("pruned_model", help="Hugging Face folder of the model to evaluate; pass the base model again "
                                             "to evaluate the dense model")
    if task.add_arguments:
        task.add_arguments(parser)
    parser.add_argument("--limit", type=int, default=task.limit,
                        help="evaluate the first N rows/texts (default: the original's count; None = all)")
    parser.add_argument("--batch-size", type=int, default=task.batch_size,
                        help="windows / candidates of one example / prompts per forward pass (results do not "
                             "depend on it beyond rounding, except sampled generation)")
    if task.family == "perplexity":
        parser.add_argument("--max-length", "--seqlen", type=int, default=task.max_length,
                            help="window length in tokens, capped at the model's max_position_embeddings")
    else:
        parser.add_argument("--max-length", type=int, default=None,
                            help="longest input in tokens; longer inputs lose their first tokens "
                                 "(default: the model's max_position_embeddings" +
                                 (" minus --max-new-tokens)" if task.family == "generation" else ")"))
    if task.stride is not None:
        parser.add_argument("--stride", type=int, default=task.stride,
                            help="tokens between window starts (original: 512)")
    if task.family == "generation":
        parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="original: 1000")
        parser.add_argument("--greedy", action="store_true",
                            help="greedy decoding instead of the original's sampling (T=0.1, top-k 50)")
        parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed (the original set none)")
    parser.add_argument("--out", default=None,
                        help=f"result JSON (default: {DEFAULT_OUT_DIR}/{task.name}-<model folder>.json)")
    parser.add_argument("--data-dir", default=None, help="prepared data root (default: legal_pruning_data/data)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (fp32 on CPU, fp16 on CUDA as the original), float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "max_length", "stride", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise DPrunerError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    stride = getattr(args, "stride", None)
    if stride is not None and stride > args.max_length:
        raise DPrunerError(f"--stride {stride} must not exceed --max-length {args.max_length}")


def _model_folder(name: str, role: str) -> str:
    """Refuse pickled whole-model files before anything could unpickle them."""
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refusal(path, role)
        raise DPrunerError(f"{role} {path} is a file; expected a Hugging Face model folder")
    return resolve_model(name)


def _config(resolved: str, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise DPrunerError(f"model {name!r}: cannot read its config ({str(err).strip().splitlines()[0]})") from None


def _check_architectures(base: str, pruned: str, base_config, pruned_config) -> None:
    def describe(config) -> str:
        return ", ".join(f"{key} {getattr(config, key, None)}" for key in ARCHITECTURE_KEYS)

    differ = [key for key in ARCHITECTURE_KEYS if getattr(base_config, key, None) != getattr(pruned_config, key, None)]
    if differ:
        raise DPrunerError(f"pruned model {pruned} ({describe(pruned_config)}) does not match base model {base} "
                           f"({describe(base_config)}): {', '.join(differ)} differ")


def _sparsity(model: nn.Module, folder: str) -> dict[str, Any]:
    """The pruning report's sparsity when the folder has one, else zeros counted in the loaded model."""
    report_path = Path(folder) / REPORT_NAME
    if report_path.is_file():
        report = read_json(report_path)
        sparsity = report.get("sparsity")
        if isinstance(sparsity, dict) and "overall_sparsity" in sparsity:
            # A structured model is smaller rather than sparser: keep its parameter counts too.
            sizes = {k: report[k] for k in ("parameters_before", "parameters_after") if k in report}
            return {"source": str(report_path), **{k: v for k, v in sparsity.items() if k != "per_layer"}, **sizes}
    counted = sparsity_report(model)
    return {"source": "counted", **{k: v for k, v in counted.items() if k != "per_layer"}}


def load_models(args: argparse.Namespace) -> Loaded:
    """Tokenizer from the base model, weights from the pruned folder, after checking they match."""
    base = _model_folder(args.base_model, "base model")
    pruned = _model_folder(args.pruned_model, "pruned model")
    base_config, pruned_config = _config(base, args.base_model), _config(pruned, args.pruned_model)
    _check_architectures(args.base_model, args.pruned_model, base_config, pruned_config)
    tokenizer = load_tokenizer(args.base_model)
    if len(tokenizer) > pruned_config.vocab_size:
        raise DPrunerError(f"the tokenizer of {args.base_model} has {len(tokenizer)} tokens but {args.pruned_model} "
                           f"has vocab_size {pruned_config.vocab_size}")
    model = load_model(pruned, dtype=args.dtype, device=args.device)
    paths = {"base_model": base, "pruned_model": pruned, "dense": base == pruned}
    return Loaded(tokenizer, model, paths, _sparsity(model, pruned))


@dataclass
class Outcome:
    """What a family runner hands back: metrics, per-example rows, effective settings, summary line."""

    metrics: dict[str, Any]
    examples: list[dict[str, Any]]
    settings: dict[str, Any]
    summary: str


def _max_positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _run_perplexity(task: Task, loaded: Loaded, data: EvalSet, args: argparse.Namespace) -> Outcome:
    positions = _max_positions(loaded.model)
    max_length = min(args.max_length, positions) if positions else args.max_length
    stride = args.stride if task.stride is not None else max_length
    metrics = {}
    examples = []
    for corpus in data.items:
        ids = loaded.tokenizer(corpus.text, return_tensors="pt").input_ids[0]
        if corpus.max_windows is not None:
            ids = ids[:corpus.max_windows * max_length]
        try:
            windows = sliding_windows(len(ids), max_length, stride, full_only=task.stride is None)
        except DPrunerError as err:
            raise DPrunerError(f"{corpus.name}: {err}") from None
        result = window_perplexity(loaded.model, ids, windows, args.batch_size, desc=corpus.name)
        metrics[corpus.name] = {**result.summary(), "documents": corpus.documents}
        # One row per scored window: the units the tables bootstrap over (dpruner.stats).
        examples += [{"id": f"{corpus.name}:{i}", "corpus": corpus.name, "nll": nll, "tokens": tokens}
                     for i, (nll, tokens) in enumerate(zip(result.window_losses, result.window_tokens))]
    summary = "; ".join(f"{name} ppl {m['ppl_window_mean']:.3f} (token-weighted {m['ppl_token_weighted']:.3f}, "
                        f"{m['windows']} windows)" for name, m in metrics.items())
    protocol = ("sliding (HF recipe, the original's)" if task.stride is not None
                else "non-overlapping full windows (SparseGPT)")
    return Outcome(metrics, examples, {"max_length": max_length, "stride": stride, "protocol": protocol}, summary)


def _run_choice(task: Task, loaded: Loaded, data: EvalSet, args: argparse.Namespace) -> Outcome:
    max_length = args.max_length or _max_positions(loaded.model) or sys.maxsize
    result = score_choices(loaded.model, loaded.tokenizer, data.items, args.batch_size, max_length)
    labels = [example.label for example in data.items]
    predictions = result.predictions
    metrics = {"accuracy": accuracy(labels, predictions), "macro_f1": macro_f1(labels, predictions),
               "examples": len(labels), "context_prefix_mismatches": result.prefix_mismatches,
               "truncated": result.truncated}
    examples = [{"id": example.id, "label": data.labels[example.label], "prediction": data.labels[prediction],
                 "scores": scores}
                for example, prediction, scores in zip(data.items, predictions, result.scores)]
    summary = f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} ({len(labels)} examples)"
    return Outcome(metrics, examples, {"max_length": max_length, "scoring": "mean candidate log-probability, no BOS"},
                   summary)


def _run_generation(task: Task, loaded: Loaded, data: EvalSet, args: argparse.Namespace) -> Outcome:
    settings = DecodingSettings(greedy=args.greedy, seed=args.seed, max_new_tokens=args.max_new_tokens)
    positions = _max_positions(loaded.model)
    max_prompt = args.max_length or (positions - args.max_new_tokens if positions else None)
    if max_prompt is not None and max_prompt < 1:
        raise DPrunerError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in "
                           f"{positions} positions; lower it or pass --max-length")
    generations = generate_first_lines(loaded.model, loaded.tokenizer, [e.prompt for e in data.items], settings,
                                       args.batch_size, max_prompt)
    per_example, means = rouge(generations.texts, [e.reference for e in data.items])
    metrics = {**means, "examples": len(data.items), "truncated_prompts": generations.truncated,
               "empty_predictions": sum(not text.strip() for text in generations.texts)}
    examples = [{"id": e.id, "prediction": text, "reference": e.reference, **scores}
                for e, text, scores in zip(data.items, generations.texts, per_example)]
    summary = ", ".join(f"{name} {100 * means[name]:.2f}" for name in means) + f" ({len(data.items)} examples)"
    return Outcome(metrics, examples, {"max_prompt_tokens": max_prompt, "decoding": settings.record()}, summary)


RUNNERS = {"perplexity": _run_perplexity, "choice": _run_choice, "generation": _run_generation}


def _default_out(task: Task, pruned_model: str) -> Path:
    name = Path(pruned_model.rstrip("/")).name or "model"
    return cli.resolve_out(f"{DEFAULT_OUT_DIR}/{task.name}-{name}.json")


def examples_path(out: Path) -> Path:
    """Per-example outputs live beside the result JSON."""
    return out.with_name(f"{out.stem}.examples.jsonl")


def main(task: Task, description: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse, check, load, evaluate, write `--out` (and its .examples.jsonl), print one summary line."""
    started = time.perf_counter()
    args = build_parser(task, description, prog or f"{task.name}").parse_args(argv)
    _check_arguments(args)
    cli.quiet_libraries()
    out = cli.resolve_out(args.out) or _default_out(task, args.pruned_model)
    if out.is_dir():
        raise DPrunerError(f"--out {out} is a folder; expected a .json file path")
    protect([Output("--out", out, folder=False), Output("per-example output", examples_path(out), folder=False)],
            model_inputs(args.base_model, args.data_dir, **{"pruned model": model_input(args.pruned_model),
                                                            "text file": getattr(args, "text_file", None),
                                                            "data file": getattr(args, "file", None)}))
    data = task.load(args)
    loaded = load_models(args)
    load_seconds = time.perf_counter() - started
    outcome = RUNNERS[task.family](task, loaded, data, args)
    result = {
        "task": task.name,
        "models": {**loaded.paths, "base_model_arg": args.base_model, "pruned_model_arg": args.pruned_model},
        "sparsity": loaded.sparsity,
        "data": data.sources,
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("base_model", "pruned_model")},
                     **outcome.settings, "dtype_loaded": str(next(loaded.model.parameters()).dtype),
                     "device_used": str(next(loaded.model.parameters()).device),
                     "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "command": " ".join(sys.argv),
        "metrics": outcome.metrics,
        "seconds": {"load": round(load_seconds, 3),
                    "evaluate": round(time.perf_counter() - started - load_seconds, 3)},
    }
    if outcome.examples:
        result["examples_file"] = str(examples_path(out))
        write_jsonl(examples_path(out), outcome.examples)
    result["seconds"]["total"] = round(time.perf_counter() - started, 3)
    write_json(out, result)
    sparsity = loaded.sparsity.get("overall_sparsity")
    print(f"{task.name}: {outcome.summary}; sparsity {sparsity:.4f} overall; {result['seconds']['total']:.1f} s -> {out}")
    return 0

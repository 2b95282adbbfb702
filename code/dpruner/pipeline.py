"""Orchestration shared by the pruning CLIs: validate, build calibration, run the driver, save.

Order matters for "nothing half-written": every check that can fail cheaply (arguments, model
structure, output conflicts, data files) runs before the model weights are loaded or anything is
written.

Calibration budget: `--nsamples` windows in total whatever the source, so every method sees the same
number of calibration tokens. `c4` draws them from C4; a domain (a shipped name such as `legal`, or a
domain YAML path) from that domain's calibration text, by default its stage-2 training strings (never
test data); `mix` draws nsamples//2 windows from C4 and the rest from the
domain text. Single-set methods get the mix as one pooled set; a method that blends named sets (MixCal,
`calibration_sets`) gets the two halves under its own names. The domain text is always windowed from
the concatenated stream (its examples are much shorter than a window).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpruner.data.calibration import DEFAULT_NSAMPLES, DEFAULT_SEED, DEFAULT_SEQLEN, c4_documents, sample_windows
from dpruner.data.domain import calibration_texts
from dpruner.data.spec import load_domain, shipped_domains
from dpruner.errors import DPrunerError
from dpruner.export import check_output_dir, save_pruned_model, versions
from dpruner.guard import Output, model_inputs, protect
from dpruner.io import ScoreWriter
from dpruner.layerwise import prune_layerwise
from dpruner.provenance import fingerprint
from dpruner.methods.base import PruningMethod
from dpruner.masks import parse_pattern
from dpruner.model_handle import ModelHandle
from dpruner.owl import OwlProfile, apply_profile
from dpruner.models import PROJECTIONS, decoder_layers, projection_modules, resolve_device, resolve_dtype
from dpruner.streaming import StreamedLayers, StreamedOutput, open_streamed, should_stream

MIX = "mix"
C4 = "c4"
# Named choices; any domain YAML path is accepted as well.
CALIBRATION_DATASETS = (C4, *shipped_domains(), MIX)
CALIBRATION_HELP = f"{', '.join(CALIBRATION_DATASETS)}, or a domain YAML path"
# Domain examples (a CaseHOLD prompt, a PubMedQA abstract) are shorter than a calibration window, so
# windows come from the concatenated stream of all of them.
DOMAIN_WINDOWING = "concat"


@dataclass
class CalibrationSpec:
    dataset: str = "c4"
    nsamples: int = DEFAULT_NSAMPLES
    seqlen: int = DEFAULT_SEQLEN
    seed: int = DEFAULT_SEED
    windowing: str = "document"
    source: str = "local"  # where C4 comes from (local sample or the hub shard)
    data_dir: str | None = None
    domain: str | None = None  # the domain half of `mix` (a name or YAML path); a domain `dataset` implies it

    def validate(self) -> None:
        if self.dataset not in CALIBRATION_DATASETS and not Path(self.dataset).is_file():
            raise DPrunerError(f"unknown calibration dataset {self.dataset!r}; expected {CALIBRATION_HELP}")
        if self.nsamples < 1:
            raise DPrunerError(f"--nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise DPrunerError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.dataset == MIX:
            if self.domain is None:
                raise DPrunerError(f"--calibration {MIX} needs --domain (a shipped domain: "
                                   f"{' or '.join(shipped_domains())}, or a domain YAML path) for its domain half")
            if self.nsamples < 2:
                raise DPrunerError(f"--calibration {MIX} needs --nsamples >= 2 (half C4, half domain), got {self.nsamples}")
        elif self.domain is not None and self.domain != self.dataset:
            raise DPrunerError(f"--domain {self.domain} conflicts with --calibration {self.dataset} "
                               f"(--domain picks the domain half of --calibration {MIX})")
        if self.domain_name() is not None:
            # Reads the rows too (milliseconds): a bad spec, file or row fails before any model loads.
            calibration_texts(load_domain(self.domain_name()), self.data_dir)

    def domain_name(self) -> str | None:
        return self.domain if self.dataset in (C4, MIX) else self.dataset


def add_calibration_options(parser) -> None:
    """The calibration options every layer-wise pruning CLI shares (defaults of SparseGPT / the original)."""
    from dpruner.data.calibration import C4_SOURCES, WINDOWING_MODES

    parser.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES,
                        help="calibration windows in total, for every method (SparseGPT / the original)")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                        help="tokens per window (the original and SparseGPT hard-code 2048 for LLaMA; "
                             "Wanda uses the model's context, 4096 for LLaMA-2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="calibration sampling seed (SparseGPT / original)")
    parser.add_argument("--windowing", choices=WINDOWING_MODES, default="document",
                        help="C4 windows: document = random window of a long-enough document (original); concat = "
                             "windows of all documents joined (ours, for small local C4 samples); domain text is "
                             "always concat")
    parser.add_argument("--c4-source", choices=C4_SOURCES, default="local",
                        help="local: the prepared offline C4 sample; hub: allenai/c4 shard 0 (original, online)")
    parser.add_argument("--data-dir", default=None, help="prepared data root (default: legal_pruning_data/data)")


def calibration_from_args(args, dataset: str, domain: str | None = None) -> CalibrationSpec:
    return CalibrationSpec(dataset=dataset, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                           windowing=args.windowing, source=args.c4_source, data_dir=args.data_dir, domain=domain)


def build_calibration(spec: CalibrationSpec, tokenizer,
                      split_names: tuple[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Named calibration sets of token windows [n, seqlen], `spec.nsamples` windows in all.

    One set named after the dataset, except `mix` with `split_names`: then its C4 half and domain
    half are two sets with those names (for methods that weigh the sources separately).
    """
    spec.validate()

    def c4(count: int) -> torch.Tensor:
        texts = c4_documents(spec.source, spec.data_dir)
        return sample_windows(tokenizer, texts, count, spec.seqlen, spec.seed, spec.windowing)

    def domain(count: int) -> torch.Tensor:
        texts = calibration_texts(load_domain(spec.domain_name()), spec.data_dir)
        return sample_windows(tokenizer, texts, count, spec.seqlen, spec.seed, DOMAIN_WINDOWING)

    if spec.dataset != MIX:
        return {spec.dataset: c4(spec.nsamples) if spec.dataset == C4 else domain(spec.nsamples)}
    general_count = spec.nsamples // 2
    halves = (c4(general_count), domain(spec.nsamples - general_count))
    if split_names is None:
        return {MIX: torch.cat(halves)}
    return dict(zip(split_names, halves))


def check_model_structure(model: str | ModelHandle, pattern: str = "unstructured") -> int:
    """Check the model's layout without loading weights, and that an N:M `pattern` divides every
    projection's input size; return its layer count."""
    handle = ModelHandle.resolve(model)
    check_pattern_fits(handle.skeleton, pattern, handle.name)
    return handle.num_layers


def check_pattern_fits(model: nn.Module, pattern: str, model_name: str) -> None:
    """N:M groups must tile each projection's inputs (decoder layers share their shapes)."""
    n_m = parse_pattern(pattern)
    if n_m is None:
        return
    for name, linear in projection_modules(decoder_layers(model)[0]).items():
        if linear.in_features % n_m[1]:
            raise DPrunerError(f"--pattern {pattern}: {name} of {model_name} has {linear.in_features} inputs, "
                               f"not a multiple of M={n_m[1]}")


def prune_with_method(model_name: str | ModelHandle, method: PruningMethod, calibration: CalibrationSpec | None, *,
                      scores_out: str | Path | None, save_pruned: str | Path | None, overwrite: bool = False,
                      dtype: str = "auto", device: str | None = None, batch_size: int = 8,
                      true_sequential: bool = False, kind: str = "scores", offload: str = "auto",
                      profile: OwlProfile | None = None) -> dict[str, Any]:
    """Run `method` layer by layer over the model; write scores and/or the pruned model.

    Data-free methods (`statistic` None) read no calibration, whatever is passed, unless the OWL
    `profile` needs it. `offload` (auto | none | disk) streams the decoder layers from the checkpoint
    instead of loading the whole model.
    """
    split_names = method.calibration_sets
    if profile is not None:
        if parse_pattern(getattr(method, "pattern", "unstructured")):
            raise DPrunerError("--sparsity-profile owl needs unstructured sparsity (an N:M pattern fixes every "
                               "block at N/M)")
        profile.check(method.sparsity)
    if method.statistic is None and profile is None:
        calibration = None
    else:
        if calibration is None:
            raise DPrunerError(f"method {method.name} needs calibration data")
        calibration.validate()
        if split_names and calibration.dataset != MIX:
            raise DPrunerError(f"method {method.name} blends C4 with domain text: it needs --calibration {MIX} "
                               f"--domain {'|'.join(shipped_domains())}|YAML, got --calibration {calibration.dataset}")
    target = resolve_device(device)
    handle = ModelHandle.resolve(model_name)
    model_name = handle.name
    settings: dict[str, Any] = dict(method.settings(), true_sequential=true_sequential, dtype=dtype,
                                    **(profile.settings() if profile else {}))
    num_layers = check_model_structure(handle, settings.get("pattern", "unstructured"))
    if calibration is not None:
        settings["calibration"] = asdict(calibration) | {"data_dir": None}
    score_input = getattr(getattr(method, "score_set", None), "folder", None)
    protect([Output("score output", scores_out), Output("pruned-model output", save_pruned)],
            model_inputs(model_name, calibration.data_dir if calibration else None, scores=score_input))
    writer = (ScoreWriter(scores_out, kind=kind, model=model_name, num_layers=num_layers,
                          modules=list(PROJECTIONS), settings=settings, overwrite=overwrite,
                          fingerprint=fingerprint(model_name))
              if scores_out else None)
    if save_pruned:
        check_output_dir(save_pruned, overwrite)
    torch_dtype = resolve_dtype(dtype, target)
    streamed = should_stream(offload, handle, torch_dtype)
    windows = build_calibration(calibration, handle.tokenizer, split_names) if calibration is not None else None

    began = time.time()
    output = None
    if streamed:
        model = open_streamed(handle, torch_dtype, target)
        output = StreamedOutput(Path(save_pruned), handle.checkpoint, torch_dtype) if save_pruned else None
        source = StreamedLayers(model, handle.checkpoint, torch_dtype, target, output)
    else:
        model, source = handle.load(dtype, device="cpu" if target.type == "cuda" else target), None
    try:
        owl = (apply_profile(profile, method, model, windows, batch_size=batch_size, device=target,
                             source=StreamedLayers(model, handle.checkpoint, torch_dtype, target) if streamed else None)
               if profile else None)
        summary = prune_layerwise(model, method, windows, batch_size=batch_size, device=target, writer=writer,
                                  true_sequential=true_sequential, source=source)
    except BaseException:
        if output is not None:
            output.abort()
        raise
    result: dict[str, Any] = {"model": model_name, "settings": settings, "seconds": round(time.time() - began, 2),
                              "offload": "disk" if streamed else "none", "this_run": summary.as_dict(),
                              "versions": versions()}
    if owl:
        result["owl"] = owl
    if save_pruned:  # before the scores are marked complete, so a failed save resumes instead of refusing
        report = {"method": method.name, "base_model": model_name, "settings": settings,
                  "scores": str(scores_out) if scores_out else None, **({"owl": owl} if owl else {})}
        if output is not None:
            output.finish(handle.config, handle.tokenizer, report)
        else:
            save_pruned_model(model, handle.tokenizer, save_pruned, report)
        result["pruned_model"] = str(save_pruned)
    if writer is not None:
        writer.finish(summary=result)
        result["scores"] = str(writer.folder)
    return result

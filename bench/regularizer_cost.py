#!/usr/bin/env python3
"""Stage-2 step time and memory of each regularizer form, side by side: does the paper-literal gradient
penalty (exact Hessian-vector product through a double backward) fit LOMO's two passes at <= 2x the
step time of the anchor form, and what memory does it add?

Every variant runs the D-Pruner trainer's step (LOMO two-pass clipping, chunked loss, gradient
checkpointing, importance accumulation) on the same batch in a fresh process, alternated `--repeats`
times, all with eager attention (the double backward needs it; the others use it too so the ratio
measures the regularizer alone). Prints median step time and peak RSS, and their ratios to `anchor`.

  python bench/regularizer_cost.py [--model smollm2-135m] [--batch 4] [--seqlen 256] [--steps 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RssSampler, interleaved, median  # noqa: E402
from lomo_memory import MALLOC_ENV, batch_of  # noqa: E402

FORMS = ("anchor", "squared_grad", "grad_penalty")


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dpruner.cli import quiet_libraries
    from dpruner.importance import DOUBLE_BACKWARD_ATTENTION, DualImportance, ImportanceSettings, projection_target
    from dpruner.lomo import Lomo
    from dpruner.loss import causal_lm_loss
    from dpruner.models import load_tokenizer, resolve_model

    quiet_libraries()
    torch.manual_seed(0)
    batch = batch_of(load_tokenizer(args.model), args.batch, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    model.config.use_cache = False
    model.set_attn_implementation(DOUBLE_BACKWARD_ATTENTION)
    model.activation_checkpointing_enable()
    model.train()
    named = dict(model.named_parameters())
    # G only needs the right shapes for cost; W0 = the starting weights, as in a real run.
    general = {n: torch.rand(p.shape, dtype=torch.bfloat16) for n, p in named.items() if projection_target(n)}
    anchors = {n: named[n].detach().clone() for n in general} if args.form == "anchor" else None
    callback = DualImportance(ImportanceSettings(args.form), named, general, anchors)
    lomo = Lomo(named.items(), lr=1e-5, clip_grad_norm=1.0, grad_callback=callback)

    def objective(lr: float) -> torch.Tensor:
        loss = causal_lm_loss(model, batch, args.loss_chunk_tokens)
        return loss + callback.gradient_penalty(loss, lr, named) if args.form == "grad_penalty" else loss

    times = []
    with RssSampler() as sampler:
        for _ in range(args.steps):
            began = time.time()
            lomo.norm_pass(objective(1e-5), 1e-5)
            lomo.update_pass(objective(1e-5), 1e-5)
            times.append(time.time() - began)
    steady = times[1:] if len(times) > 1 else times
    print(json.dumps({"form": args.form, "peak_mb": sampler.peak_mb, "step_s": statistics.median(steady)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--loss-chunk-tokens", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--form", choices=FORMS, default="anchor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    common = ["--model", args.model, "--batch", str(args.batch), "--seqlen", str(args.seqlen),
              "--steps", str(args.steps), "--loss-chunk-tokens", str(args.loss_chunk_tokens)]
    runs = interleaved(__file__, {f: [*common, "--form", f] for f in FORMS}, args.repeats, env=MALLOC_ENV)
    print(f"model {args.model}, batch {args.batch} x {args.seqlen}, eager attention, gradient checkpointing, "
          f"two-pass clipping, {args.steps} steps x {args.repeats} runs (medians), CPU fp32")
    base_t, base_m = median(runs["anchor"], "step_s"), median(runs["anchor"], "peak_mb")
    for form in FORMS:
        t, m = median(runs[form], "step_s"), median(runs[form], "peak_mb")
        print(f"  {form:13s} step {t:6.2f} s ({t / base_t:.2f}x anchor)   peak RSS {m:6.0f} MB ({m / base_m:.2f}x)")
    ratio = median(runs["grad_penalty"], "step_s") / base_t
    print(f"grad_penalty within 2x of the anchor step: {'yes' if ratio <= 2 else 'no'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Stage-2 memory and speed: plain LOMO, the D-Pruner trainer (LOMO + regularizer + importance) and
AdamW full fine-tuning on the same model, batch and settings (gradient checkpointing on, global-norm
clipping 1.0 for all), each in a fresh process, alternated `--repeats` times.

Prints peak resident memory during training (sampled; the model's weights and the interpreter
included) and the median step time of each, as ratios to AdamW, plus the importance overhead relative
to a plain LOMO step. It also prints the training's own memory, the peak minus the process's memory
before the model is loaded (interpreter, libraries, tokenizer, batch), which is what
`torch.cuda.max_memory_allocated` would count on a GPU. Every child runs with glibc's mmap threshold
fixed (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the system and resident memory follows
the memory in use instead of the allocator's high-water fragmentation; `--default-malloc` turns it
off. All three compute the same loss the same way: the trainer's chunked LM-head loss
(`--loss-chunk-tokens`, default the config's; 0 = the model's own loss over full-batch logits).
Targets: LOMO <= 0.5x AdamW memory, D-Pruner trainer <= 0.7x, importance overhead <= 15 %.

  python bench/lomo_memory.py [--model smollm2-135m] [--batch 4] [--seqlen 256] [--steps 4] [--repeats 2]
                              [--loss-chunk-tokens 256] [--default-malloc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RssSampler, current_rss_mb, interleaved, median  # noqa: E402

from dpruner.config import TrainConfig  # noqa: E402

VARIANTS = ("adamw", "lomo", "dpruner")
# Allocations above 128 KiB are mmapped and unmapped on free (glibc's default threshold rises with use).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def batch_of(tokenizer, batch: int, seqlen: int):
    """The same real legal batch for every variant: CaseHOLD training prompts cut to `seqlen`."""
    from dpruner.data.domain import domain_texts
    from dpruner.trainer import collate

    texts = domain_texts(TrainConfig(casehold_examples=batch, billsum_examples=0))
    ids = [tokenizer(t, truncation=True, max_length=seqlen).input_ids for t in texts[:batch]]
    return collate(ids, tokenizer.pad_token_id)


def child(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dpruner.cli import quiet_libraries
    from dpruner.importance import DualImportance, ImportanceSettings, projection_target
    from dpruner.lomo import Lomo
    from dpruner.loss import causal_lm_loss
    from dpruner.models import load_tokenizer, resolve_model

    quiet_libraries()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    batch = batch_of(tokenizer, args.batch, args.seqlen)
    base_mb = current_rss_mb()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    model.train()
    named = dict(model.named_parameters())
    chunk = args.loss_chunk_tokens or None
    times = []
    if args.mode == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(_lr: float) -> None:
            optimizer.zero_grad(set_to_none=True)
            causal_lm_loss(model, batch, chunk).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    else:
        callback = None
        if args.mode == "dpruner":
            # G only needs the right shapes and dtype for cost; the values do not change the work done.
            general = {n: torch.rand(p.shape, dtype=torch.bfloat16) for n, p in named.items() if projection_target(n)}
            callback = DualImportance(ImportanceSettings(), named, general)
        lomo = Lomo(named.items(), lr=1e-5, clip_grad_norm=1.0, grad_callback=callback)

        def step(lr: float) -> None:
            lomo.norm_pass(causal_lm_loss(model, batch, chunk), lr)
            lomo.update_pass(causal_lm_loss(model, batch, chunk), lr)
    with RssSampler() as sampler:
        for index in range(args.steps):
            began = time.time()
            step(1e-5)
            times.append(time.time() - began)
    steady = times[1:] if len(times) > 1 else times  # the first step pays one-off allocations
    print(json.dumps({"mode": args.mode, "peak_mb": sampler.peak_mb, "train_mb": sampler.peak_mb - base_mb,
                      "step_s": statistics.median(steady)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--loss-chunk-tokens", type=int, default=TrainConfig.loss_chunk_tokens,
                        help="tokens per LM-head chunk in the loss (default: %(default)s, the trainer's); 0 = full logits")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator thresholds alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=VARIANTS, default="lomo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    common = ["--model", args.model, "--batch", str(args.batch), "--seqlen", str(args.seqlen), "--steps", str(args.steps),
              "--loss-chunk-tokens", str(args.loss_chunk_tokens or 0)]
    runs = interleaved(__file__, {m: [*common, "--mode", m] for m in VARIANTS}, args.repeats,
                       env=None if args.default_malloc else MALLOC_ENV)
    print(f"model {args.model}, batch {args.batch} x {args.seqlen} tokens, gradient checkpointing, clip 1.0, "
          f"{args.steps} steps, {args.repeats} runs each (medians); CPU fp32; "
          f"loss over {'chunks of ' + str(args.loss_chunk_tokens) + ' tokens' if args.loss_chunk_tokens else 'full logits'}; "
          f"malloc {'default' if args.default_malloc else 'mmap threshold 128 KiB'}")
    adam = {key: median(runs["adamw"], key) for key in ("peak_mb", "train_mb", "step_s")}
    for mode in VARIANTS:
        mem, train, t = (median(runs[mode], key) for key in ("peak_mb", "train_mb", "step_s"))
        print(f"  {mode:8s} peak RSS {mem:6.0f} MB ({mem / adam['peak_mb']:.2f}x AdamW)   "
              f"training memory {train:6.0f} MB ({train / adam['train_mb']:.2f}x)   "
              f"step {t:6.2f} s ({t / adam['step_s']:.2f}x)")
    overhead = median(runs["dpruner"], "step_s") / median(runs["lomo"], "step_s") - 1
    print(f"importance + regularizer overhead over a plain LOMO step: {overhead * 100:+.1f} % (target <= 15 %)")
    for key, what in (("peak_mb", "peak RSS"), ("train_mb", "training memory")):
        print(f"targets on {what}: LOMO <= 0.5x AdamW -> {median(runs['lomo'], key) / adam[key]:.2f}x; "
              f"D-Pruner trainer <= 0.7x -> {median(runs['dpruner'], key) / adam[key]:.2f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Throughput of our evaluators against the original's one-at-a-time loops, on the same inputs.

CaseHOLD: the original runs one full forward pass per (example, candidate) and a log-softmax over all
positions; ours encodes each example's context once and runs its candidates as one batch, projecting
to the vocabulary only at candidate positions. Legal perplexity: the original runs one window per
pass with `labels` (the model's loss over full logits); ours batches equal windows and projects only
the scored positions. The script checks the scores agree and prints throughput and the speed-up.

Example: python bench/eval_throughput.py --casehold-rows 20 --ppl-texts 5 --max-length 256 --stride 128
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpruner import cli
from dpruner.data import eval_sets
from dpruner.evaluation.choice import first_argmax, score_choices
from dpruner.evaluation.perplexity import sliding_windows, window_perplexity
from dpruner.models import EMBEDDED_MODEL, load_model, load_tokenizer

# Agreement we require between the two implementations (fp32; they differ only in kernel shapes).
SCORE_TOLERANCE = 1e-3
PPL_RELATIVE_TOLERANCE = 1e-4


@torch.inference_mode()
def naive_casehold(model, tokenizer, examples) -> tuple[list[list[float]], int]:
    """The original test_casehold.py loop: a full forward and log-softmax per candidate."""
    scores, tokens = [], 0
    for example in examples:
        context_len = len(tokenizer(example.context, add_special_tokens=False).input_ids)
        row = []
        for candidate in example.candidates:
            joint = tokenizer(example.context + candidate, add_special_tokens=False).input_ids
            tokens += len(joint)
            log_probs = torch.log_softmax(model(torch.tensor([joint])).logits[0].float(), dim=-1)
            picked = [log_probs[t - 1, joint[t]] for t in range(context_len, len(joint))]
            row.append(float(sum(picked)) / len(picked))
        scores.append(row)
    return scores, tokens


@torch.inference_mode()
def naive_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The original legal_perplexity_evaluation.py loop (HF recipe): one window per pass, outputs.loss."""
    losses, prev_end, tokens = [], 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-(end - prev_end)] = -100
        losses.append(float(model(window, labels=labels).loss))
        tokens += window.shape[1]
        prev_end = end
        if end == len(ids):
            break
    return math.exp(sum(losses) / len(losses)), tokens


@dataclass
class Timing:
    """Fastest wall and process-CPU seconds of one side. CPU time is the steadier measure when other
    jobs share the machine (wall time then depends on what else runs)."""

    wall: float = math.inf
    cpu: float = math.inf

    def add(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = min(self.wall, wall), min(self.cpu, cpu)


def race(naive: Callable[[], Any], ours: Callable[[], Any], repeat: int) -> tuple[Any, Timing, Any, Timing]:
    """Alternate the two sides `repeat` times; keep each side's fastest run."""
    timings = (Timing(), Timing())
    values: list[Any] = [None, None]
    for _ in range(repeat):
        for side, fn in enumerate((naive, ours)):
            wall, cpu = time.perf_counter(), time.process_time()
            values[side] = fn()
            timings[side].add(time.perf_counter() - wall, time.process_time() - cpu)
    return values[0], timings[0], values[1], timings[1]


def speed(naive: Timing, ours: Timing, count: float, unit: str) -> str:
    return (f"naive {naive.wall:.1f} s wall / {naive.cpu:.1f} s CPU ({count / naive.wall:.2f} {unit}/s), "
            f"ours {ours.wall:.1f} s wall / {ours.cpu:.1f} s CPU ({count / ours.wall:.2f} {unit}/s), "
            f"speed-up {naive.wall / ours.wall:.2f}x wall, {naive.cpu / ours.cpu:.2f}x CPU")


def main() -> None:
    parser = cli.make_parser(__doc__, prog="eval_throughput.py")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--casehold-rows", type=int, default=20)
    parser.add_argument("--ppl-texts", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per pass for perplexity")
    parser.add_argument("--repeat", type=int, default=1, help="alternate naive/ours this often, keep the fastest")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    cli.quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    print(f"model {args.model}, device {next(model.parameters()).device}, torch threads {torch.get_num_threads()}")
    with torch.inference_mode():  # warm-up, so neither side pays first-call costs
        model(torch.tensor([tokenizer("warm up the kernels").input_ids]))

    examples = eval_sets.casehold(limit=args.casehold_rows).items
    (naive_scores, tokens), naive_s, ours, ours_s = race(
        lambda: naive_casehold(model, tokenizer, examples),
        lambda: score_choices(model, tokenizer, examples, progress=False), args.repeat)
    diff = max(abs(a - b) for x, y in zip(naive_scores, ours.scores) for a, b in zip(x, y))
    same = [first_argmax(row) for row in naive_scores] == ours.predictions
    print(f"CaseHOLD {len(examples)} rows ({tokens} tokens): {speed(naive_s, ours_s, len(examples), 'rows')}; "
          f"max |score diff| {diff:.2e}, same predictions: {same}")

    corpus = eval_sets.multilegalpile(limit=args.ppl_texts).items[0]
    ids = tokenizer(corpus.text, return_tensors="pt").input_ids[0].to(next(model.parameters()).device)
    windows = sliding_windows(len(ids), args.max_length, args.stride)
    (naive_ppl, tokens), naive_s, result, ours_s = race(
        lambda: naive_perplexity(model, ids, args.max_length, args.stride),
        lambda: window_perplexity(model, ids, windows, args.batch_size, progress=False), args.repeat)
    rel = abs(result.ppl_window_mean - naive_ppl) / naive_ppl
    print(f"perplexity {args.ppl_texts} texts, {len(windows)} windows of {args.max_length} / stride {args.stride} "
          f"({tokens} tokens): {speed(naive_s, ours_s, tokens, 'tokens')}; ppl {naive_ppl:.4f} vs "
          f"{result.ppl_window_mean:.4f} (relative diff {rel:.1e})")
    if diff > SCORE_TOLERANCE or not same or rel > PPL_RELATIVE_TOLERANCE:
        raise SystemExit("error: the batched evaluators disagree with the naive loops")


if __name__ == "__main__":
    main()

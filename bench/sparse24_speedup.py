#!/usr/bin/env python3
"""Does 2:4 sparsity make a pruned linear faster? Dense fp16 matmul vs PyTorch's semi-structured
sparse matmul (`torch.sparse.to_sparse_semi_structured`: cuSPARSELt or CUTLASS kernels, NVIDIA sm80+).

The weight of one real projection (the embedded model's `--layer` mlp.up_proj) is 2:4-pruned with our
magnitude method's N:M mask, then LLaMA-7B's projection shapes (random weights, same mask) are timed
the same way: y = x W^T with x of `--tokens` rows (batch x sequence), CUDA events, warm-up first,
median of `--repeats` timings of `--iters` calls each. Prints the card, each shape's times and the
speed-up (dense time / sparse time). Without CUDA it prints why and exits 0.

Example: python bench/sparse24_speedup.py --tokens 4096 --iters 50
"""

from __future__ import annotations

import statistics

import torch

from dpruner import cli
from dpruner.methods import get_method
from dpruner.models import EMBEDDED_MODEL, decoder_layers, load_model

# (name, out_features, in_features) of LLaMA-7B's projections (hidden 4096, MLP 11008).
LLAMA7B_SHAPES = (("llama-7b q/k/v/o_proj", 4096, 4096), ("llama-7b gate/up_proj", 11008, 4096),
                  ("llama-7b down_proj", 4096, 11008))
# Semi-structured sparse kernels exist from Ampere (compute capability 8.0) on.
MIN_CAPABILITY = (8, 0)
PATTERN = "2:4"


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    """2 of every 4 consecutive inputs of each row zeroed by magnitude (our N:M mask)."""
    outcome = get_method("magnitude", sparsity=0.5, pattern=PATTERN).prune(0, "bench", weight.float().cpu(), None)
    return outcome.weight


def time_ms(fn, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean milliseconds per call, measured with CUDA events."""
    for _ in range(max(3, iters // 5)):
        fn()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


@torch.inference_mode()
def compare(name: str, weight: torch.Tensor, tokens: int, iters: int, repeats: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    dense = prune_24(weight).to(device="cuda", dtype=torch.float16)
    sparse = to_sparse_semi_structured(dense)
    x = torch.randn(tokens, dense.shape[1], device="cuda", dtype=torch.float16)
    expected = torch.nn.functional.linear(x, dense)
    got = torch.nn.functional.linear(x, sparse)
    error = float((got - expected).abs().max() / expected.abs().max())
    dense_ms = time_ms(lambda: torch.nn.functional.linear(x, dense), iters, repeats)
    sparse_ms = time_ms(lambda: torch.nn.functional.linear(x, sparse), iters, repeats)
    print(f"{name:24s} {dense.shape[0]:>6d}x{dense.shape[1]:<6d} tokens {tokens:>6d}: dense {dense_ms:8.3f} ms, "
          f"2:4 {sparse_ms:8.3f} ms ({type(sparse).__name__}), speed-up {dense_ms / sparse_ms:5.2f}x, "
          f"max rel. diff {error:.1e}")


def main(argv=None) -> int:
    parser = cli.make_parser(__doc__, prog="sparse24_speedup.py")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model whose projection is benchmarked first")
    parser.add_argument("--layer", type=int, default=0, help="decoder layer whose mlp.up_proj is benchmarked")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384],
                        help="rows of x (batch x sequence: 1x2048 and 8x2048)")
    parser.add_argument("--iters", type=int, default=50, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per shape (the median is reported)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("semi-structured (2:4) acceleration needs a CUDA GPU (NVIDIA sm80+, e.g. A100/H100); "
              "no CUDA device here, nothing timed")
        return 0
    card = torch.cuda.get_device_name()
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        print(f"{card} is sm{capability[0]}{capability[1]}; semi-structured (2:4) kernels need sm80+, nothing timed")
        return 0
    cli.quiet_libraries()
    print(f"card: {card} (sm{capability[0]}{capability[1]}), torch {torch.__version__}, fp16, y = x W^T")
    model = load_model(args.model, dtype="float32", device="cpu")
    up_proj = decoder_layers(model)[args.layer].mlp.up_proj.weight.detach()
    shapes = [(f"{args.model} L{args.layer} up_proj", up_proj)]
    generator = torch.Generator().manual_seed(0)
    shapes += [(name, torch.randn(rows, cols, generator=generator) * 0.02) for name, rows, cols in LLAMA7B_SHAPES]
    for tokens in args.tokens:
        for name, weight in shapes:
            compare(name, weight, tokens, args.iters, args.repeats)
    return 0


if __name__ == "__main__":
    cli.run(main)

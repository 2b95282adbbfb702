#!/usr/bin/env python3
"""Memory each stage needs, from the byte counts of docs/SCALING.md, for LLaMA-2-7B / 13B / 70B, and
where each stage fits (1 x 24 GB, 1 x 80 GB, 8 x 80 GB GPUs; 24 / 64 / 256 GB CPU machines).

Formula, not measurement: `bench/scale_memory.py` measures the streamed CPU stages on checkpoints
that do not fit this machine and checks the layer terms. GB = 1e9 bytes.

Example: python bench/scaling_table.py --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
# (hidden, intermediate, layers, attention heads, key/value heads, vocabulary) from each config.json.
MODELS = {
    "LLaMA-2-7B": (4096, 11008, 32, 32, 32, 32000),
    "LLaMA-2-13B": (5120, 13824, 40, 40, 40, 32000),
    "LLaMA-2-70B": (8192, 28672, 80, 64, 8, 32000),
}
# Stage-2 batch of the original args_lomo.yaml (8 sequences) at the paper's 2048-token cap.
STAGE2_TOKENS = 8 * 2048
# Memory the interpreter, CUDA context and libraries take before any weight (measured floor on CPU
# ~0.35 GB, bench/scale_memory.py; ~1 GB of CUDA context on a GPU).
FLOOR_CPU, FLOOR_GPU = 0.5 * GB, 1.0 * GB
SHARDS = {"1x24GB": (1, 24), "1x80GB": (1, 80), "8x80GB": (8, 80)}
CPU_BOXES = (24, 64, 256)


@dataclass
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def layer_params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        return 2 * self.hidden * self.hidden + 2 * kv * self.hidden + 3 * self.hidden * self.inter

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def projection_params(self) -> int:
        return self.layers * self.layer_params

    def stats_bytes(self) -> float:
        """Stage-1 statistics of one layer, fp32: x x^T of the 7 inputs, then OBS on the widest
        (H and its inverse Cholesky factor, the fp32 weight and its update)."""
        hessians = 4 * (6 * self.hidden ** 2 + self.inter ** 2)
        solver = 4 * (2 * self.inter ** 2 + 2 * self.hidden * self.inter)
        return hessians + solver


def stage1(shape: Shape, tokens: int, compute: int, streamed: bool) -> float:
    """Peak of the layer-wise driver: weights + statistics + two copies of the calibration activations."""
    weights = (shape.layer_params + shape.vocab * shape.hidden) * compute if streamed else shape.params * compute
    return weights + shape.stats_bytes() + 2 * tokens * shape.hidden * compute


def stage2(shape: Shape, world: int, weight_bytes: int = 2) -> float:
    """Per process: weights (fp16 on GPUs, fp32 on CPU) partitioned by ZeRO-3, G (bf16) and the
    importance accumulator (fp32) in full on every rank, one layer's gathered weights and fp32
    update, checkpointed activations, one 256-token chunk of logits."""
    weights = weight_bytes * (shape.params / world + shape.layer_params) + 4 * shape.hidden * shape.inter
    importance = (2 + 4) * shape.projection_params
    activations = weight_bytes * STAGE2_TOKENS * shape.hidden * (shape.layers + 16) + 4 * 256 * shape.vocab
    return weights + importance + activations


def stage3(shape: Shape, stored: int, streamed: bool) -> float:
    """Masking: weights in their stored dtype, one layer's fp32 scores, masks (1 byte per weight);
    streamed, the embedding and head pass through one at a time."""
    layer = shape.layer_params * (stored + 4 + 1)
    if streamed:
        return layer + shape.vocab * shape.hidden * stored
    return shape.params * stored + shape.projection_params + layer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128, help="stage-1 calibration windows (SparseGPT)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window (SparseGPT, the original)")
    parser.add_argument("--bench-shape", default=None, metavar="SHAPE",
                        help="instead: the streamed CPU formula for a bench/random_checkpoint.py shape "
                             "(vocabulary 49152), to hold against bench/scale_memory.py")
    args = parser.parse_args(argv)
    tokens = args.nsamples * args.seqlen
    if args.bench_shape:
        from random_checkpoint import SHAPES

        hidden, inter, heads, kv_heads, layers = SHAPES[args.bench_shape]
        shape = Shape(hidden, inter, layers, heads, kv_heads, 49152)
        print(f"{args.bench_shape}, {args.nsamples} x {args.seqlen} tokens, fp32 compute, bf16 checkpoint: "
              f"stage 1 streamed {stage1(shape, tokens, 4, True) / 2**30:.3f} GiB, stage 3 streamed "
              f"{stage3(shape, 2, True) / 2**30:.3f} GiB above the floor, whatever the depth; "
              f"one layer {4 * shape.layer_params / 2**30:.3f} GiB fp32")
        return 0
    print(f"stage-1 calibration {args.nsamples} x {args.seqlen} tokens; GB = 1e9 bytes; formula, not measured\n")
    print("| model | params | stage 1 GPU fp16 (streamed, GPU) | stage 1 CPU fp32 in memory | stage 1 CPU fp32 streamed "
          "| stage 2 per GPU, 1 / 8 GPUs | stage 2 CPU fp32 | stage 3 fp16 in memory | stage 3 streamed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dims in MODELS.items():
        shape = Shape(*dims)
        print(f"| {name} | {shape.params / 1e9:.2f} B | {stage1(shape, tokens, 2, True) / GB:.1f} "
              f"| {stage1(shape, tokens, 4, False) / GB:.1f} | {stage1(shape, tokens, 4, True) / GB:.1f} "
              f"| {stage2(shape, 1) / GB:.1f} / {stage2(shape, 8) / GB:.1f} | {stage2(shape, 1, 4) / GB:.1f} | {stage3(shape, 2, False) / GB:.1f} "
              f"| {stage3(shape, 2, True) / GB:.2f} |")
    print("\n| model | where | stage 1 | stage 2 | stage 3 |")
    print("|---|---|---|---|---|")
    for name, dims in MODELS.items():
        shape = Shape(*dims)
        for label, (world, size) in SHARDS.items():
            fits = [stage1(shape, tokens, 2, True) + FLOOR_GPU <= size * GB,
                    stage2(shape, world) + FLOOR_GPU <= size * GB, True]
            print(f"| {name} | {label} GPU | {'fits' if fits[0] else 'no'} (streamed) "
                  f"| {'fits' if fits[1] else 'no'} | fits (streamed) |")
        for size in CPU_BOXES:
            s1 = "in memory" if stage1(shape, tokens, 4, False) + FLOOR_CPU <= size * GB else (
                "streamed" if stage1(shape, tokens, 4, True) + FLOOR_CPU <= size * GB else "no")
            s2 = "fits (fp32, slow)" if stage2(shape, 1, 4) + FLOOR_CPU <= size * GB else "no"
            s3 = "in memory" if stage3(shape, 2, False) + FLOOR_CPU <= size * GB else "streamed"
            print(f"| {name} | {size} GB CPU | {s1} | {s2} | {s3} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

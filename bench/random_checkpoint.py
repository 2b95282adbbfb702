#!/usr/bin/env python3
"""Write a random-weight LLaMA-shaped checkpoint (bf16 safetensors shards + index, config, the
embedded model's tokenizer) one tensor at a time, so checkpoints larger than memory can be made.

Shapes are those of public models; the vocabulary is the embedded tokenizer's (49,152), so the
calibration pipeline runs on them unchanged. Weights ~ N(0, 0.02) (the LLaMA initializer range),
norms 1.

Example: python bench/random_checkpoint.py /tmp/tinyllama --shape tinyllama-1.1b --layers 44
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

# (hidden, intermediate, attention heads, key/value heads, layers) from each model's config.json.
SHAPES = {
    "smollm2-360m": (960, 2560, 15, 5, 32),  # HuggingFaceTB/SmolLM2-360M (LLaMA architecture)
    "tinyllama-1.1b": (2048, 5632, 32, 4, 22),  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "openllama-3b": (3200, 8640, 32, 32, 26),  # openlm-research/open_llama_3b
    "llama-2-7b": (4096, 11008, 32, 32, 32),  # meta-llama/Llama-2-7b-hf
}
# LlamaConfig.initializer_range, the std LLaMA checkpoints are initialised with.
INIT_STD = 0.02
SHARD_BYTES = 2 * 10**9  # small shards, so the sharded index path is exercised


def llama_config(shape: str, layers: int | None, vocab: int):
    from transformers import LlamaConfig

    hidden, intermediate, heads, kv_heads, depth = SHAPES[shape]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers or depth, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2, dtype=torch.bfloat16)


def write_checkpoint(out: Path, shape: str, layers: int | None = None, seed: int = 0, device: str = "cpu") -> Path:
    """Random bf16 weights for every tensor of the model's state dict, written tensor by tensor
    (drawn on `device`: a GPU draws a 7B model's 6.7e9 normals in seconds)."""
    from transformers import AutoTokenizer

    from dpruner.io import atomic_dir
    from dpruner.models import build_skeleton, embedded_model_dir
    from dpruner.streaming import ShardedWriter

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = llama_config(shape, layers, len(tokenizer))
    skeleton = build_skeleton(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items() if p.is_meta}
    generator = torch.Generator(device).manual_seed(seed)
    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, shapes, torch.bfloat16, SHARD_BYTES)
        for name, size in tqdm(shapes.items(), desc="random tensors", unit="tensor"):
            tensor = (torch.ones(size) if name.endswith("norm.weight")
                      else torch.randn(size, generator=generator, device=device).mul_(INIT_STD))
            writer.write(name, tensor.to(torch.bfloat16))
        writer.finish()
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output model folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="layer shape")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn (cpu or cuda)")
    args = parser.parse_args(argv)
    print(write_checkpoint(args.out, args.shape, args.layers, args.seed, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

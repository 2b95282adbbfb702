#!/usr/bin/env python3
"""Stage-2 importance memory per rank (G, W0 and the scores) under DeepSpeed ZeRO-3 at world size 1 and
2: one short training run each through the DeepSpeed launcher, reading `importance_bytes_per_rank`
from its summary.json. Under ZeRO-3 each rank holds its partition only, so world 2 should hold half.
G is random (its values do not change the bytes). On CPU the processes use gloo and fp32 weights.

  python bench/importance_memory.py [--model smollm2-135m] [--regularizer anchor] [--worlds 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_general(model: str, out: Path) -> Path:
    """A stage-1 folder of the model's projection shapes (bytes are all that is measured)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpruner.io import save_score_folder
    from dpruner.models import decoder_layers, projection_modules, resolve_model

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
    layers = [{name: torch.rand(module.weight.shape) for name, module in projection_modules(layer).items()}
              for layer in decoder_layers(skeleton)]
    return save_score_folder(out, layers, kind="general_importance", model=model, settings={})


def measure(model: str, general: Path, world: int, regularizer: str, out: Path, port: int) -> dict:
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(port),
               str(REPO / "code" / "src" / "train_lomo.py"), "config/args_lomo.yaml",
               f"model_name_or_path={model}", f"general_importance_dir={general}", f"output_dir={out}",
               f"regularizer={regularizer}", "max_steps=1", "per_device_train_batch_size=1", "data_max_length=32",
               "casehold_examples=4", "billsum_examples=0", "save_strategy='no'", "deepspeed=config/ds_config_cpu.json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode:
        sys.exit(f"world {world}: training failed\n{result.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--regularizer", default="anchor")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        general = random_general(args.model, Path(tmp) / "general")
        summaries = {world: measure(args.model, general, world, args.regularizer, Path(tmp) / f"world{world}",
                                    6300 + world) for world in args.worlds}
    print(f"model {args.model}, regularizer {args.regularizer}, DeepSpeed ZeRO-3, "
          f"{summaries[args.worlds[0]]['dtype']} on {summaries[args.worlds[0]]['device']}")
    first = summaries[args.worlds[0]]["importance_bytes_per_rank"]
    for world, summary in summaries.items():
        held = summary["importance_bytes_per_rank"]
        print(f"  world {world}: importance {held / 2**20:8.1f} MiB per rank ({held} bytes, {held / first:.3f}x world "
              f"{args.worlds[0]})")


if __name__ == "__main__":
    main()

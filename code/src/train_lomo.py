#!/usr/bin/env python3
"""Stage 2 of D-Pruner: LOMO fine-tuning on domain text that accumulates the dual importance.

  deepspeed --master_port 6006 code/src/train_lomo.py config/args_lomo.yaml [key=value ...]
  python code/src/train_lomo.py config/args_lomo.yaml [key=value ...]            (single process)
  torchrun --nproc_per_node 2 code/src/train_lomo.py CONFIG deepspeed=null        (plain PyTorch DDP-style)

Every YAML key can be overridden as key=value (e.g. max_steps=4 general_importance_dir=outputs/gi).
Relative paths in the config resolve against the repository root, then the config file's folder.
Writes OUTPUT_DIR/importance (per-layer safetensors + manifest) for stage 3, and per-epoch checkpoints
that a rerun resumes from.

Several domains at once (DRPruning's DRO mixing), e.g. config/args_lomo_domains.yaml:
  domains=[legal,medical] domain_proportions=null domain_mixing=constant|dro domain_eval_examples=16
  dro_update_interval=10 dro_loss=train|validation dro_reference_losses=null dro_rho=0.05 dro_ema=0.1
  dro_min_prob=0.2 dro_smoothing=null
Every key with its default and origin: docs/CONFIG.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `code/` (no install needed)

from dpruner import cli  # noqa: E402
from dpruner.config import TrainConfig, load_config  # noqa: E402
from dpruner.provenance import ALLOW_OPTION  # noqa: E402


def build_parser():
    parser = cli.make_parser(__doc__, prog="train_lomo.py")
    parser.add_argument("config", help="stage-2 YAML config, e.g. config/args_lomo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config overrides; keys: {', '.join(TrainConfig().to_dict())}")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (the rank comes from the environment)")
    parser.add_argument(ALLOW_OPTION, action="store_true",
                        help="use general_importance_dir even if its manifest says it was computed for another model")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    cli.quiet_libraries()
    from dpruner.trainer import main_summary, train

    summary = train(config, allow_other_model=args.allow_other_model)
    if summary is not None:
        print(main_summary(summary))
    return 0


if __name__ == "__main__":
    cli.run(main)

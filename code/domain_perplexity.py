#!/usr/bin/env python3
"""Per-domain relative perplexity of a pruned model on the held-out examples of a multi-domain stage 2.

Reads STAGE2_OUTPUT/config.yaml (its `domains`, their counts, `seed`, `domain_eval_examples`), rebuilds
the same held-out split, and scores BASE (dense) and PRUNED on every domain: relative perplexity =
exp(pruned loss - dense loss). Reports every domain, the worst domain and the mean over domains, each with a 95 % bootstrap interval
over the held-out examples (stratified by domain), and keeps the per-example losses so that `constant`
and `dro` runs can be compared pairwise "at equal average" (scripts/domains_dro.sh).

Example: python code/domain_perplexity.py smollm2-135m outputs/domains/dro/models/pruned outputs/domains/dro
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from dpruner import cli
from dpruner.errors import DPrunerError


def build_parser():
    parser = cli.make_parser(__doc__, prog="domain_perplexity.py")
    parser.add_argument("base_model", help="dense model (tokenizer and reference): a folder, hub id, or smollm2-135m")
    parser.add_argument("pruned_model", help="Hugging Face folder of the model to evaluate")
    parser.add_argument("stage2_output", help="output_dir of a stage-2 run with `domains` (holds config.yaml)")
    parser.add_argument("--out", default=None, help="result JSON (default: PRUNED/domain_perplexity.json)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config_path = Path(args.stage2_output) / "config.yaml"
    if not config_path.is_file():
        raise DPrunerError(f"{config_path} not found; expected the output_dir of a stage-2 run")
    from dpruner.config import load_config

    config = load_config(config_path)
    if not config.domains or not config.domain_eval_examples:
        raise DPrunerError(f"{config_path}: needs `domains` and domain_eval_examples > 0 (the held-out examples)")
    cli.quiet_libraries()
    from dpruner.evaluation.relative_perplexity import example_losses, summarize
    from dpruner.io import write_json
    from dpruner.loss import causal_lm_loss
    from dpruner.mixing import domain_labels, split_domain, worst_and_mean
    from dpruner.models import load_model, load_tokenizer
    from dpruner.trainer import TokenizedTexts, collate

    tokenizer = load_tokenizer(args.base_model)
    held = {label: TokenizedTexts(tokenizer, split_domain(config, entry)[1], config.data_max_length)
            for label, entry in zip(domain_labels(config.domains), config.domains)}
    per_example = {}
    for role, name in (("dense", args.base_model), ("pruned", args.pruned_model)):
        model = load_model(name, dtype=args.dtype, device=args.device)
        device = next(model.parameters()).device

        def loss_fn(batch):
            return causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()}, None)

        per_example[role] = {domain: example_losses(loss_fn, data, lambda b: collate(b, tokenizer.pad_token_id))
                             for domain, data in held.items()}
        del model
    domains = {}
    for name in held:
        examples = [{"dense_nll": dense["nll"], "pruned_nll": pruned["nll"], "tokens": dense["tokens"]}
                    for dense, pruned in zip(per_example["dense"][name], per_example["pruned"][name])]
        tokens = sum(e["tokens"] for e in examples)
        dense_loss, pruned_loss = (sum(e[key] for e in examples) / tokens for key in ("dense_nll", "pruned_nll"))
        domains[name] = {"held_out_examples": len(examples), "dense_loss": dense_loss, "pruned_loss": pruned_loss,
                         "dense_perplexity": math.exp(dense_loss), "perplexity": math.exp(pruned_loss),
                         "relative_perplexity": math.exp(pruned_loss - dense_loss), "examples": examples}
    result = {"base_model": args.base_model, "pruned_model": args.pruned_model, "stage2_output": args.stage2_output,
              "domain_mixing": config.domain_mixing, "domains": domains, **worst_and_mean(domains),
              "intervals": summarize(domains), "command": " ".join(sys.argv)}
    out = cli.resolve_out(args.out) or Path(args.pruned_model) / "domain_perplexity.json"
    write_json(out, result)
    shown = ", ".join(f"{name} {entry['relative_perplexity']:.4f}" for name, entry in domains.items())
    print(f"relative perplexity: {shown}; worst {result['worst_domain']['name']}, "
          f"mean {result['mean_relative_perplexity']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)

#!/usr/bin/env python3
"""Peer check: our SparseGPT / Wanda against llm-compressor's (`oneshot` with SparseGPTModifier /
WandaPruningModifier) on the embedded model, with the SAME calibration windows.

Why: an independent implementation of the same algorithm is the cheapest check that ours is right.
Target: our wikitext-2 perplexity within 2 % of llm-compressor's for the same method and calibration.

How: llm-compressor pins transformers<=5.17, so it runs in its own venv (.cache/peer-venv, made by
scripts/peer_env.sh) as a child process of this script. The parent (main venv) builds the calibration
windows once and writes them to a safetensors file; the child prunes a fresh copy of the model with
llm-compressor and writes back only the pruned projection weights (plus a check that nothing else
moved). Every perplexity is then computed here, by the same code (our non-overlapping-window helper,
SparseGPT protocol) on the same model class, so the comparison is apples to apples. Both sides prune
the 7 projections of every decoder layer, layer by layer with pruned outputs fed to the next layer,
blocksize 128, dampening 0.01, 50 % unstructured (per output row for Wanda), fp32, same threads.

Prints: method | ours ppl | llm-compressor ppl | ppl diff % | ours time | theirs time | ours/theirs |
sparsity each | mask agreement. Exits 1 if a side failed; exits 0 with the reason if llm-compressor
cannot be installed or imported here.

Example: python bench/peer_llmcompressor.py --nsamples 16 --seqlen 256 --eval-windows 40 --eval-seqlen 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = REPO_ROOT / ".cache" / "peer-llmcompressor"
PEER_ENV_SCRIPT = REPO_ROOT / "scripts" / "peer_env.sh"
METHODS = ("sparsegpt", "wanda")
TARGET_PCT = 2.0
# The 7 projections of a LLaMA-style decoder layer (dpruner.models.PROJECTIONS; the child cannot import dpruner).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------------
# child: runs in the peer venv, never imports dpruner
# --------------------------------------------------------------------------------------------------

def child_main(args: argparse.Namespace) -> int:
    """Prune with llm-compressor's oneshot and save the projection weights it produced."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = load_file(args.calib)["input_ids"]
    nsamples, seqlen = ids.shape
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.config.use_cache = False
    layer_class = type(model.model.layers[0]).__name__
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    # Modifier targets are the layers whose Linear children get pruned: the decoder layers, which hold
    # exactly the 7 projections (the default "Linear" would also match lm_head).
    common = dict(sparsity=args.sparsity, mask_structure="0:0", targets=[layer_class], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, block_size=args.blocksize, dampening_frac=args.percdamp)
    else:
        modifier = WandaPruningModifier(**common)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(),
                                          "attention_mask": torch.ones_like(ids).tolist()})
    load_before = os.getloadavg()
    began = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=[modifier],
            num_calibration_samples=nsamples, max_seq_length=seqlen, batch_size=args.batch_size,
            shuffle_calibration_samples=False, pipeline="sequential", sequential_targets=[layer_class],
            propagate_error=True, output_dir=None)
    seconds = time.perf_counter() - began

    after = dict(model.named_parameters())
    prefix = "model.layers."
    projections = {name: p.detach().contiguous().clone() for name, p in after.items()
                   if name.startswith(prefix) and name.endswith(".weight")
                   and name[len(prefix):-len(".weight")].split(".", 1)[-1] in PROJECTIONS}
    changed_other = sorted(name for name, p in after.items()
                           if name not in projections and not torch.equal(p.detach(), before[name]))
    save_file(projections, args.out)
    versions = {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}
    result = {"seconds": seconds, "modules": len(projections), "changed_non_projection": changed_other,
              "modifier": repr(modifier), "layer_class": layer_class, "versions": versions,
              "load_average": [load_before, os.getloadavg()]}
    Path(args.out + ".json").write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------------
# parent: main venv
# --------------------------------------------------------------------------------------------------

def peer_python() -> tuple[str | None, str]:
    """Create/reuse the peer venv; (python path, '') or (None, the reason it could not be made)."""
    result = subprocess.run(["bash", str(PEER_ENV_SCRIPT)], capture_output=True, text=True)
    if result.returncode != 0:
        tail = [line for line in result.stderr.splitlines() if not line.startswith("WARNING: Location")]
        return None, f"scripts/peer_env.sh failed (exit {result.returncode}):\n" + "\n".join(tail[-20:])
    python = result.stdout.strip().splitlines()[-1]
    probe = subprocess.run([python, "-c", "import llmcompressor, compressed_tensors, datasets"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, "llmcompressor does not import in the peer venv:\n" + probe.stderr.strip()[-3000:]
    return python, ""


def run_theirs(python: str, method: str, calib: Path, model_dir: Path, args: argparse.Namespace) -> dict:
    """Run the child in the peer venv; its output (llm-compressor logs to stdout) goes to a log file,
    its result to a JSON file beside the weights."""
    out = WORK_DIR / f"llmcompressor-{method}.safetensors"
    log = WORK_DIR / f"llmcompressor-{method}.log"
    command = [python, __file__, "--child", "--method", method, "--calib", str(calib), "--out", str(out),
               "--model", str(model_dir), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--sparsity", str(args.sparsity), "--blocksize", str(args.blocksize), "--percdamp", str(args.percdamp)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH="")
    began = time.perf_counter()
    result_path = Path(str(out) + ".json")
    result_path.unlink(missing_ok=True)
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    process_seconds = time.perf_counter() - began
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise RuntimeError(f"llm-compressor {method} failed (exit {result.returncode}), log {log}:\n" + "\n".join(tail))
    info = json.loads(result_path.read_text())
    result_path.unlink()
    info.update(weights=str(out), log=str(log), process_seconds=process_seconds)
    return info


def projection_zeros(model) -> tuple[float, float, float]:
    """Overall, min and max fraction of zeros over the 7 projections of every decoder layer."""
    from dpruner.models import decoder_layers, projection_modules

    zeros = total = 0
    fractions = []
    for layer in decoder_layers(model):
        for linear in projection_modules(layer).values():
            z = int((linear.weight == 0).sum())
            zeros += z
            total += linear.weight.numel()
            fractions.append(z / linear.weight.numel())
    return zeros / total, min(fractions), max(fractions)


def mask_agreement(a, b) -> tuple[float, float, float]:
    """Fraction of projection weights that both models zero or both keep: overall, in layer 0 (whose
    inputs are the same embeddings on both sides, so it isolates the pruning kernels) and in the last
    layer (after calibration activations have passed through every pruned layer of each side)."""
    from dpruner.models import decoder_layers, projection_modules

    per_layer = []
    for la, lb in zip(decoder_layers(a), decoder_layers(b)):
        same = total = 0
        for (_, x), (_, y) in zip(projection_modules(la).items(), projection_modules(lb).items()):
            same += int(((x.weight == 0) == (y.weight == 0)).sum())
            total += x.weight.numel()
        per_layer.append((same, total))
    overall = sum(s for s, _ in per_layer) / sum(t for _, t in per_layer)
    return overall, per_layer[0][0] / per_layer[0][1], per_layer[-1][0] / per_layer[-1][1]


def wikitext_ids(tokenizer, windows: int, seqlen: int):
    """WikiText-2 test as SparseGPT joins it, tokenized once, cut to the first `windows` full windows."""
    from dpruner.data.eval_sets import wikitext2

    text = wikitext2().items[0].text
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < windows * seqlen:
        print(f"note: wikitext-2 has {len(ids)} tokens, {len(ids) // seqlen} windows of {seqlen}", flush=True)
    return ids[:windows * seqlen]


def perplexity(model, ids, seqlen: int, batch_size: int) -> float:
    """Our non-overlapping-window perplexity (SparseGPT protocol: exp of the mean window loss)."""
    from dpruner.evaluation.perplexity import sliding_windows, window_perplexity

    windows = sliding_windows(len(ids), seqlen, seqlen, full_only=True)
    return window_perplexity(model, ids, windows, batch_size, progress=False).ppl_window_mean


def load_theirs(weights: str):
    """A fresh embedded model with llm-compressor's pruned projection weights copied in."""
    import torch
    from safetensors.torch import load_file

    from dpruner.models import EMBEDDED_MODEL, load_model

    model = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu")
    state = load_file(weights)
    params = dict(model.named_parameters())
    missing = [name for name in params if name.startswith("model.layers.") and name.endswith("_proj.weight")
               and name not in state]
    if missing or len(state) != len([n for n in params if n.endswith("_proj.weight")]):
        raise RuntimeError(f"llm-compressor weights do not cover the projections (missing {missing[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model


def parent_main(args: argparse.Namespace) -> int:
    """Set up the peer venv, prune with both sides, evaluate everything here, print the table."""
    import torch
    from safetensors.torch import save_file

    from dpruner.layerwise import prune_layerwise
    from dpruner.methods import get_method
    from dpruner.models import EMBEDDED_MODEL, embedded_model_dir, load_model, load_tokenizer
    from dpruner.pipeline import CalibrationSpec, build_calibration

    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    python, reason = peer_python()
    if python is None:
        print(f"llm-compressor peer check NOT RUN: {reason}")
        return 0
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    spec = CalibrationSpec(dataset="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    calibration = build_calibration(spec, tokenizer)["c4"].contiguous()
    calib_path = WORK_DIR / "calibration.safetensors"
    save_file({"input_ids": calibration}, str(calib_path))
    eval_ids = wikitext_ids(tokenizer, args.eval_windows, args.eval_seqlen)
    print(f"calibration: {tuple(calibration.shape)} C4 windows (seed {spec.seed}) -> {calib_path}; "
          f"eval: wikitext-2 test, {len(eval_ids) // args.eval_seqlen} windows x {args.eval_seqlen}; "
          f"threads {args.threads}, batch {args.batch_size}", flush=True)

    dense = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu")
    dense_ppl = perplexity(dense, eval_ids, args.eval_seqlen, args.eval_batch_size)
    del dense
    print(f"dense ppl {dense_ppl:.3f}", flush=True)

    rows, failures, versions = [], [], {}
    for name in args.methods:
        row = {"method": name}
        try:
            info = run_theirs(python, name, calib_path, model_dir, args)
            versions = info["versions"]
            if info["changed_non_projection"]:
                changed = info["changed_non_projection"][:5]
                raise RuntimeError(f"llm-compressor changed non-projection parameters: {changed}")
            theirs = load_theirs(info["weights"])
            Path(info["weights"]).unlink()  # 0.4 GB of fp32 projections; the log stays
            row.update(theirs_seconds=info["seconds"], theirs_process_seconds=info["process_seconds"],
                       theirs_sparsity=projection_zeros(theirs),
                       theirs_ppl=perplexity(theirs, eval_ids, args.eval_seqlen, args.eval_batch_size),
                       modifier=info["modifier"], theirs_load=info["load_average"])
            print(f"[{name}] llm-compressor: {row['theirs_seconds']:.1f} s, ppl {row['theirs_ppl']:.3f}", flush=True)
        except Exception as err:  # report the side that failed, still run ours
            failures.append(f"llm-compressor {name}: {err}")
            theirs = None
        try:
            ours = load_model(EMBEDDED_MODEL, dtype="float32", device="cpu")
            options = {"blocksize": args.blocksize, "percdamp": args.percdamp} if name == "sparsegpt" else {}
            method = get_method(name, sparsity=args.sparsity, **options)
            load_before = os.getloadavg()
            began = time.perf_counter()
            prune_layerwise(ours, method, {"c4": calibration}, batch_size=args.batch_size,
                            device=torch.device("cpu"), progress=False)
            row.update(ours_seconds=time.perf_counter() - began, ours_load=[load_before, os.getloadavg()],
                       ours_sparsity=projection_zeros(ours),
                       ours_ppl=perplexity(ours, eval_ids, args.eval_seqlen, args.eval_batch_size))
            print(f"[{name}] ours: {row['ours_seconds']:.1f} s, ppl {row['ours_ppl']:.3f}", flush=True)
            if theirs is not None:
                row["agreement"] = mask_agreement(ours, theirs)
        except Exception as err:
            failures.append(f"ours {name}: {type(err).__name__}: {err}")
        rows.append(row)

    print_table(rows, dense_ppl, args)
    print("\npeer venv versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"main venv versions: torch {torch.__version__}, transformers {transformers.__version__}")
    print("1-min load average before/after each timed pruning (2 cores; other processes make times noisy):")
    for row in rows:
        for side in ("ours", "theirs"):
            if f"{side}_load" in row:
                before, after = row[f"{side}_load"]
                print(f"  {row['method']} {side}: {before[0]:.2f} -> {after[0]:.2f}")
    for row in rows:
        if "modifier" in row:
            print(f"{row['method']} modifier: {row['modifier']}")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        return 1
    return 0


def print_table(rows: list[dict], dense_ppl: float, args: argparse.Namespace) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "failed"

    header = ("method", "ours ppl", "llmc ppl", "diff %", "ours s", "llmc s", "ours/llmc",
              "ours sparsity", "llmc sparsity", "mask agree all/L0/last", f"within {TARGET_PCT:g}%")
    lines = [header]
    for r in rows:
        ours, theirs = r.get("ours_ppl"), r.get("theirs_ppl")
        diff = 100 * (ours - theirs) / theirs if ours is not None and theirs is not None else None
        ratio = (r["ours_seconds"] / r["theirs_seconds"]
                 if r.get("ours_seconds") is not None and r.get("theirs_seconds") is not None else None)
        sp = lambda s: f"{s[0]:.5f} [{s[1]:.4f}-{s[2]:.4f}]" if s else "failed"  # noqa: E731
        agree = "/".join(f"{x:.4f}" for x in r["agreement"]) if r.get("agreement") else "-"
        lines.append((r["method"], fmt(ours, ".3f"), fmt(theirs, ".3f"), fmt(diff, "+.2f"),
                      fmt(r.get("ours_seconds"), ".1f"), fmt(r.get("theirs_seconds"), ".1f"), fmt(ratio, ".2f"),
                      sp(r.get("ours_sparsity")), sp(r.get("theirs_sparsity")), agree,
                      ("yes" if abs(diff) <= TARGET_PCT else "NO") if diff is not None else "-"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print(f"\nsmollm2-135m, {args.nsamples} x {args.seqlen} C4 calibration windows, sparsity {args.sparsity}; "
          f"wikitext-2 ppl over {args.eval_windows} x {args.eval_seqlen} tokens; dense ppl {dense_ppl:.3f}")
    print("times: pruning only (ours: prune_layerwise; llm-compressor: the oneshot call, incl. its tracing); "
          "sparsity: zeros over the 7 projections, overall [min-max per module]")
    for i, line in enumerate(lines):
        print(" | ".join(str(cell).ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (C4)")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    parser.add_argument("--eval-windows", type=int, default=40, help="wikitext-2 windows scored")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="wikitext-2 window length")
    parser.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward pass in evaluation")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size (both sides)")
    parser.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening fraction (both sides)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward (both sides)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default: ours)")
    # child-only options
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.seed is None:
        from dpruner.data.calibration import DEFAULT_SEED
        args.seed = DEFAULT_SEED
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())

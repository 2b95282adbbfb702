#!/usr/bin/env python3
"""How much do pruned models move with the thread count (the run-to-run cause found on one machine)?

Runs stage 1 + SparseGPT pruning (code/general.py) of the same model on the same calibration windows
at each thread count, twice each, in fresh processes, and prints: whether repeats are byte-identical,
the fraction of projection weights whose pruned/kept status differs between thread counts, and the
WikiText-2 perplexity of each pruned model (code/general_perplexity_evaluation.py, same windows).

  python bench/reproducibility.py [--model smollm2-135m] [--threads 1,2] [--nsamples 16] [--seqlen 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CODE = Path(__file__).resolve().parents[1] / "code"


def run(script: str, *args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, str(CODE / script), *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed:\n{result.stderr[-3000:]}")


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def zero_masks(folder: Path):
    from dpruner.io import load_tensors

    return {k: v == 0 for k, v in load_tensors(folder / "model.safetensors").items() if k.endswith("proj.weight")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--nsamples", default="16")
    parser.add_argument("--seqlen", default="256")
    parser.add_argument("--eval-windows", default="40", help="WikiText-2 windows for the perplexity check")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for threads in counts:
            for repeat in (0, 1):
                out = root / f"t{threads}_r{repeat}"
                run("general.py", args.model, "c4", "--nsamples", args.nsamples, "--seqlen", args.seqlen,
                    "--out", str(out / "scores"), "--save-pruned", str(out / "pruned"), threads=threads)
            run("general_perplexity_evaluation.py", args.model, str(root / f"t{threads}_r0" / "pruned"),
                "--datasets", "wikitext2", "--max-length", "512", "--limit", args.eval_windows,
                "--out", str(root / f"t{threads}_ppl.json"), threads=threads)
        reference = zero_masks(root / f"t{counts[0]}_r0" / "pruned")
        total = sum(m.numel() for m in reference.values())
        print("| threads | repeat byte-identical | mask entries differing from threads="
              f"{counts[0]} | WikiText-2 ppl |\n|---|---|---|---|")
        for threads in counts:
            first, second = (root / f"t{threads}_r{r}" / "pruned" for r in (0, 1))
            masks = zero_masks(first)
            differing = sum(int((masks[k] ^ reference[k]).sum()) for k in reference)
            ppl = json.loads((root / f"t{threads}_ppl.json").read_text())["metrics"]["wikitext2"]["ppl_window_mean"]
            print(f"| {threads} | {weights_digest(first) == weights_digest(second)} | "
                  f"{differing} / {total} ({100 * differing / total:.3f} %) | {ppl:.3f} |")


if __name__ == "__main__":
    main()

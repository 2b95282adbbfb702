#!/usr/bin/env python3
"""The first-GPU-run check, one table in at most 8 minutes on one GPU (run it as bench/gpu_check.sh).

Steps, each a fresh process with its own time budget (the budgets sum to <= 480 s):
  stage1-small  general.py on the embedded model (fp16, CUDA), the G stage 2 needs
  sparse24      bench/sparse24_speedup.py: dense vs torch semi-structured 2:4 matmul, LLaMA-7B shapes
  stage2-gpu    train_lomo.py under the deepspeed launcher, ZeRO-3 (config/ds_config.json), fp16, 4 steps
  stage2-cpu    the same 4 steps in plain PyTorch fp32 on the CPU (runs beside the GPU steps)
  eval          bench/eval_throughput.py on CUDA: batched evaluators vs the original loops
  ckpt-7b       bench/random_checkpoint.py: a random bf16 LLaMA-2-7B-shaped checkpoint (13.5 GB)
  stage1-7b     general.py --offload disk on it: SparseGPT scores streaming one layer at a time
then compares the GPU and CPU stage-2 importance (mask agreement at 50 % per matrix).

Example: bash bench/gpu_check.sh            (--plan prints the steps and budgets without running them)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The limit for the whole check on one GPU.
TOTAL_BUDGET_S = 480
STAGE2_STEPS = 4
CALIBRATION = ["--nsamples", "16", "--seqlen", "512"]


@dataclass
class Step:
    name: str
    what: str
    command: list[str]
    budget_s: int
    env: dict[str, str] | None = None
    background: bool = False


def steps(out: Path, python: str) -> list[Step]:
    stage2 = [f"general_importance_dir={out / 'general'}", f"max_steps={STAGE2_STEPS}", "per_device_train_batch_size=8",
              "data_max_length=256", "casehold_examples=16", "billsum_examples=4", "overwrite_output_dir=true"]
    train = [str(REPO / "code" / "src" / "train_lomo.py"), "config/args_lomo.yaml"]
    return [
        Step("stage1-small", "stage 1 (SparseGPT G) on the embedded model, fp16 CUDA",
             [python, "code/general.py", "smollm2-135m", "c4", *CALIBRATION, "--dtype", "float16", "--device", "cuda",
              "--out", str(out / "general"), "--overwrite"], 40),
        Step("stage2-cpu", f"stage 2, {STAGE2_STEPS} steps, plain PyTorch fp32 on CPU (reference)",
             [python, *train, *stage2, f"output_dir={out / 'lomo_cpu'}", "deepspeed=null"], 300,
             env={"CUDA_VISIBLE_DEVICES": ""}, background=True),
        Step("sparse24", "2:4 semi-structured matmul vs dense fp16, LLaMA-7B shapes",
             [python, "bench/sparse24_speedup.py", "--tokens", "4096", "16384", "--iters", "20", "--repeats", "3"], 60),
        Step("stage2-gpu", f"stage 2, {STAGE2_STEPS} steps, DeepSpeed ZeRO-3 fp16 on 1 GPU",
             [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "6206", *train, *stage2,
              f"output_dir={out / 'lomo_gpu'}", "deepspeed=config/ds_config.json"], 90),
        Step("eval", "evaluator throughput on CUDA (CaseHOLD rows, perplexity tokens)",
             [python, "bench/eval_throughput.py", "--device", "cuda", "--casehold-rows", "40", "--ppl-texts", "10",
              "--max-length", "1024", "--stride", "512", "--batch-size", "8"], 60),
        Step("ckpt-7b", "random bf16 LLaMA-2-7B-shaped checkpoint (13.5 GB) on disk",
             [python, "bench/random_checkpoint.py", str(out / "llama7b"), "--shape", "llama-2-7b", "--device", "cuda"],
             70),
        Step("stage1-7b", "stage 1 streamed (--offload disk) on the 7B-shaped checkpoint, fp16 CUDA",
             [python, "code/general.py", str(out / "llama7b"), "c4", "--offload", "disk", "--nsamples", "8",
              "--seqlen", "512", "--dtype", "float16", "--device", "cuda", "--out", str(out / "scores7b"),
              "--overwrite"], 150),
    ]


def summarise(name: str, text: str) -> str:
    """The one number per step the table shows, taken from the step's own output."""
    patterns = {
        "sparse24": r"(llama-7b [^\n]*?tokens\s+\d+):.*?speed-up\s+([\d.]+)x",
        "eval": r"(CaseHOLD|perplexity)[^\n]*?speed-up ([\d.]+)x wall",
    }
    if name in patterns:
        found = re.findall(patterns[name], text)
        return "; ".join(f"{label.split(':')[0].strip()} {value}x" for label, value in found) or "no numbers"
    if name.startswith("stage1"):
        match = re.search(r'"seconds": ([\d.]+)', text)
        return f"{match.group(1)} s pruning" if match else "done"
    if name.startswith("stage2"):
        match = re.search(r"dual importance: .*?\((.*)\)", text)
        return match.group(1) if match else "done"
    return "done"


def mask_agreement(a: Path, b: Path, sparsity: float = 0.5) -> float:
    """Fraction of positions where the per-matrix masks of two importance folders agree."""
    sys.path.insert(0, str(REPO / "code"))
    from dpruner.io import ScoreSet
    from dpruner.masks import matrix_mask

    left, right = ScoreSet.open(a), ScoreSet.open(b)
    same = total = 0
    for index in range(left.num_layers):
        x, y = left.layer(index), right.layer(index)
        for module in x:
            same += int((matrix_mask(x[module], sparsity) == matrix_mask(y[module], sparsity)).sum())
            total += x[module].numel()
    return same / total


def run(out: Path, python: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows, background = [], {}
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO / "code")), TQDM_DISABLE="1")
    for step in steps(out, python):
        log = open(out / f"{step.name}.log", "w")
        began = time.time()
        process = subprocess.Popen(step.command, cwd=REPO, env={**env, **(step.env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
        if step.background:
            background[step.name] = (step, process, began, log)
            continue
        rows.append(finish(step, process, began, log, out))
    for step, process, began, log in background.values():
        rows.append(finish(step, process, began, log, out))
    if all((out / f"lomo_{kind}" / "importance").is_dir() for kind in ("gpu", "cpu")):
        agreement = mask_agreement(out / "lomo_gpu" / "importance", out / "lomo_cpu" / "importance")
        rows.append(("stage2 gpu vs cpu", f"50 % per-matrix masks agree on {agreement:.2%} of weights", 0, "ok"))
    print("| check | result | s | status |\n|---|---|---|---|")
    for name, result, seconds, status in rows:
        print(f"| {name} | {result} | {seconds:.0f} | {status} |")
    return 0 if all(row[3] == "ok" for row in rows) else 1


def finish(step: Step, process: subprocess.Popen, began: float, log, out: Path) -> tuple[str, str, float, str]:
    try:
        process.wait(timeout=max(1.0, step.budget_s - (time.time() - began)))
        status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = f"over {step.budget_s} s budget"
    log.close()
    text = (out / f"{step.name}.log").read_text(errors="replace")
    return step.name, summarise(step.name, text) if status == "ok" else f"see {out / step.name}.log", \
        time.time() - began, status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--plan", action="store_true", help="print the steps and their budgets, run nothing")
    args = parser.parse_args(argv)
    plan = steps(args.out, sys.executable)
    if args.plan:
        for step in plan:
            print(f"{step.name}\t{step.budget_s}\t{'background' if step.background else 'sequential'}\t"
                  f"{' '.join(step.command)}")
        print(f"total\t{sum(s.budget_s for s in plan if not s.background)}\t(limit {TOTAL_BUDGET_S})")
        return 0
    return run(args.out, sys.executable)


if __name__ == "__main__":
    raise SystemExit(main())

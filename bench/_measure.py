"""Helpers for benchmarks that compare variants side by side, each in its own fresh process."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run `script --child ...` (extra environment variables `env`) and parse the JSON line it prints last."""
    result = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def interleaved(script: str, variants: dict[str, list[str]], repeats: int,
                env: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Alternate the variants (a, b, c, a, b, c, ...) so slow drifts of the machine hit all alike."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, args in variants.items():
            runs[name].append(run_child(script, args, env))
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Peak resident memory over a stretch of code, sampled from /proc every few milliseconds
    (ru_maxrss would also count one-off peaks such as model loading)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_mb = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self._interval)

    def __enter__(self) -> "RssSampler":
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())

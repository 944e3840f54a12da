"""Timing: variants interleaved in one process, and fresh worker processes for what must not share one."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def interleaved(runs: dict[str, Callable[[int], None]], reps: int, warmup: dict[str, int],
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant over `reps` rounds, after each variant's warm-up calls.

    Round r runs the variants in order, reversed on odd rounds (A B, B A, ...): a slow-down of the machine lands
    on both sides of every ratio. Each call gets its own index (e.g. which batch to use)."""
    names = list(runs)
    index = 0
    for name in names:
        for _ in range(warmup.get(name, 0)):
            runs[name](index)
            index += 1
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(reps):
        for name in names if round_number % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            runs[name](index)
            sync()
            times[name].append(time.perf_counter() - start)
            index += 1
    return times


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median(values) -> float:
    return statistics.median(values)


def run_worker(args: list[str], timeout: float = 1800) -> dict:
    """Run `python -m pipelines.bench_workers ARGS`; its last stdout line is a JSON report."""
    command = [sys.executable, "-m", "pipelines.bench_workers", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed ({' '.join(args[:3])}...): exit {done.returncode}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

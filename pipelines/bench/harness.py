"""Measurement: variants interleaved in one process, paired ratios with their spread, fresh worker processes.

A comparison of variants A and B runs them in alternating rounds (A B, B A, A B, ...), so a machine that slows
down slows both sides of a round, and takes the ratio A_r / B_r of each round r. The figure is the median of those
paired ratios, printed with their range (min-max) over at least `MIN_REPETITIONS` rounds: a target inside the
range is "within noise" (`pipelines.bench.report.Result.verdict`), neither met nor missed.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.bench.plans import Plan

MIN_REPETITIONS = 5


@dataclass(frozen=True)
class Context:
    """What every section gets: the plan, a scratch directory (removed afterwards), the device, and the synthetic
    caches of the stage-2 steps with images under their keys."""

    plan: Plan
    scratch: Path
    device: str
    cache_root: Path
    caches: dict[str, Path]
    image_root: Path


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements (or of paired ratios), with their range."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = [float(value) for value in values]
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def contains(self, bound: float) -> bool:
        return self.low <= bound <= self.high

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.count)

    def to_dict(self) -> dict:
        return {"median": self.median, "low": self.low, "high": self.high, "count": self.count}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """numerator[r] / denominator[r] for each round r."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def ratio_spread(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
    return Spread.of(paired_ratios(numerator, denominator))


def median(values) -> float:
    return statistics.median(values)


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timer see the device's work: CUDA kernels run asynchronously."""
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def interleaved(runs: dict[str, Callable[[int], None]], reps: int, warmup: dict[str, int],
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant over `reps` rounds, after each variant's warm-up calls.

    Round r runs the variants in order, reversed on odd rounds (A B, B A, ...). Each call gets its own index
    (e.g. which batch to use)."""
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


def run_worker(args: list[str], timeout: float = 1800) -> dict:
    """Run `python -m pipelines.bench_workers ARGS`; its last stdout line is a JSON report."""
    command = [sys.executable, "-m", "pipelines.bench_workers", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed ({' '.join(args[:3])}...): exit {done.returncode}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

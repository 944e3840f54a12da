"""Fresh-process entry points of `transagent bench`: `python -m pipelines.bench_workers COMMAND ...`.

    memory         build one stage-2 variant, run a few training steps, report the peak memory of those steps
    extract-again  run `transagent extract ...` in this process and report whether torch was ever imported

Each prints one JSON object as its last line of stdout. A memory peak must come from a process that held nothing
else, hence one process per variant.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout


class PeakMemory:
    """Peak anonymous RSS (sampled every `interval` s from /proc/self/statm: resident minus file-backed and shared
    pages, so memory-mapped cache files do not count), VmHWM since entry, and the CUDA allocator's peak."""

    def __init__(self, device: str, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, anon_rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_anon = anon_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, anon_rss())

    def report(self) -> dict:
        out = {"peak_anon_rss_bytes": self.peak_anon, "vm_hwm_bytes": _status_bytes("VmHWM"),
               "peak_gpu_allocated_bytes": None}
        if self.device.startswith("cuda"):
            import torch

            out["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        return out


def anon_rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            fields = handle.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _status_bytes(name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory(args) -> dict:
    """Build only `args.variant`, run one warm-up step, then measure the peak of each of `args.steps` steps."""
    from pathlib import Path

    # imported here, not at the top: `extract-again` must show that a complete cache needs no torch at all
    from pipelines.bench.harness import synchronizer
    from pipelines.bench.plans import PLANS
    from pipelines.bench.stage2 import build_trainers, step_batches

    plan = PLANS[args.plan]
    trainer = build_trainers(plan, Path(args.cache_root), args.device, Path(args.run_dir), [args.variant])[args.variant]
    warmup, *batches = step_batches(plan, 1 + args.steps, seed=100)
    sync = synchronizer(args.device)
    trainer.step(*warmup)   # the optimiser's momentum buffers appear in the first step
    sync()
    setup_anon = anon_rss()
    start = time.perf_counter()
    steps = []
    for batch in batches:
        with PeakMemory(args.device) as peak:
            trainer.step(*batch)
            sync()
        steps.append(peak.report())
    measure = "peak_gpu_allocated_bytes" if args.device.startswith("cuda") else "peak_anon_rss_bytes"
    return {"variant": args.variant, "device": args.device, "steps": args.steps, "setup_anon_rss_bytes": setup_anon,
            "seconds": time.perf_counter() - start, "measure": measure,
            "peak_bytes": [step[measure] for step in steps], "per_step": steps}


def extract_again(argv: list[str]) -> dict:
    """`transagent extract ARGV` in this process; captures its output (the plan's lines are log messages, on
    stderr)."""
    from pipelines.cli import main

    captured = io.StringIO()
    with redirect_stdout(captured), redirect_stderr(captured):
        main(argv, standalone_mode=False)
    return {"torch_imported": "torch" in sys.modules, "transformers_imported": "transformers" in sys.modules,
            "output": captured.getvalue()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_workers")
    commands = parser.add_subparsers(dest="command", required=True)
    mem = commands.add_parser("memory")
    mem.add_argument("--plan", required=True)
    mem.add_argument("--variant", required=True)
    mem.add_argument("--cache-root", required=True)
    mem.add_argument("--run-dir", required=True)
    mem.add_argument("--device", default="cpu")
    mem.add_argument("--steps", type=int, default=2)
    again = commands.add_parser("extract-again")
    again.add_argument("cli_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    report = memory(args) if args.command == "memory" else extract_again(args.cli_args)
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()

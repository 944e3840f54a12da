"""Stage 2 through its loader: short epochs of the trainer's own loop, teacher rows read in the main thread
(workers 0) or by two loader workers, against the student-only epoch with the same workers.

A repetition is one epoch of `plan.loader_steps` steps per variant, the variants alternating (A B C, C B A, ...)
and each keeping its loader (and its persistent workers) across repetitions. Inside an epoch the main thread's
time blocked on the next batch is taken apart from the step: with workers, that wait is what is left of the
images and teacher rows on the critical path. The epoch's first batch is waited for in any case (workers start
on it when the epoch starts), so the share is taken over the later steps and the first wait is reported apart.
"""
from __future__ import annotations

import os
import time

from distill.batches import EpochOrder
from distill.trainer import Trainer, epoch_items
from pipelines.bench.harness import Context, Spread, median, ratio_spread
from pipelines.bench.plans import Plan
from pipelines.bench.report import Result
from pipelines.bench.stage2 import build_trainers

LOADER_VARIANTS = {"student, 2 workers": ("student", 2), "cached, 0 workers": ("cached", 0),
                   "cached, 2 workers": ("cached", 2)}


class TimedEpochs:
    """One variant's trainer and loader; `epoch(r)` runs repetition r and returns its timings."""

    def __init__(self, trainer: Trainer, steps: int):
        self.trainer, self.steps = trainer, steps
        self.order = EpochOrder(trainer.config.optim.batch_size)
        self.loader = trainer.batch_loader(self.order)

    def epoch(self, repetition: int) -> dict:
        trainer = self.trainer
        items = epoch_items(trainer.keys, trainer.labels, trainer.views, trainer.config.seed, repetition)
        self.order.items = items[:self.steps * trainer.config.optim.batch_size]
        waits, steps = [], []
        start = time.perf_counter()
        batches = iter(self.loader)
        for _ in range(len(self.order)):
            asked = time.perf_counter()
            batch = next(batches)
            got = time.perf_counter()
            trainer.step(batch.pixels, batch.labels, batch.items, batch.rows)
            waits.append(got - asked)
            steps.append(time.perf_counter() - got)
        seconds = time.perf_counter() - start
        for _ in batches:   # the epoch is over: let the loader see its end
            pass
        return {"seconds": seconds, "waits": waits, "steps": steps}


def loader_epochs(plan: Plan, context: Context) -> dict:
    """{variant: [timings of each repetition]} over `plan.reps` interleaved repetitions after `plan.warmup`."""
    runs = {}
    for name, (variant, workers) in LOADER_VARIANTS.items():
        run_dir = context.scratch / f"loader-{variant}-{workers}"
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = build_trainers(plan, context.cache_root, context.device, run_dir, [variant], context.image_root,
                                 workers)[variant]
        runs[name] = TimedEpochs(trainer, plan.loader_steps)
    names = list(runs)
    out = {name: [] for name in names}
    for repetition in range(plan.warmup + plan.reps):
        for name in names if repetition % 2 == 0 else names[::-1]:
            timings = runs[name].epoch(repetition)
            if repetition >= plan.warmup:
                out[name].append(timings)
    return {"epochs": out, "steps_per_epoch": plan.loader_steps, "warmup": plan.warmup}


def wait_shares(epochs: list[dict]) -> list[float]:
    """Per repetition: the main thread's wait for batches after the first, as a share of those steps."""
    return [sum(e["waits"][1:]) / sum(e["steps"][1:]) for e in epochs]


def loader_results(device: str, raw: dict) -> list[Result]:
    epochs = raw["epochs"]
    seconds = {name: [e["seconds"] for e in runs] for name, runs in epochs.items()}
    student, main_thread, workers = (seconds[name] for name in LOADER_VARIANTS)
    shares = {name: Spread.of(wait_shares(runs)).scaled(100) for name, runs in epochs.items()}
    step = {name: median(s for e in runs for s in e["steps"]) for name, runs in epochs.items()}
    wait = {name: median(w for e in runs for w in e["waits"][1:]) for name, runs in epochs.items()}
    first = {name: median(e["waits"][0] for e in runs) for name, runs in epochs.items()}
    details = {"median_step_seconds": step, "median_wait_seconds": wait, "median_first_wait_seconds": first,
               "median_epoch_seconds": {name: median(s) for name, s in seconds.items()},
               "steps_per_epoch": raw["steps_per_epoch"]}
    overhead, with_workers = ratio_spread(workers, student), ratio_spread(workers, main_thread)
    cached_w2, cached_w0 = "cached, 2 workers", "cached, 0 workers"
    return [
        Result(1, "stage2_time_overhead", "stage-2 epoch, all caches / student-only, 2 workers (time)",
               overhead.median, "x", "<= 1.05", device,
               f"{step[cached_w2]:.2f} s vs {step['student, 2 workers']:.2f} s per step: with the rows off the "
               f"critical path the difference is what the cached step computes and the student-only one does "
               f"not (the gates and the L_VAC terms over every layer and vision agent)", details, overhead),
        Result(1, "stage2_workers_time", "stage-2 epoch, all caches, 2 workers / 0 workers (time)",
               with_workers.median, "x", "<= 1.05", device,
               f"the workers' decoding and reads take CPU time the step's threads would use: on "
               f"{len(os.sched_getaffinity(0))} cores they share the cores instead of filling idle ones", details,
               with_workers),
        Result(1, "stage2_batch_wait", "main thread waiting for a batch, 2 workers (% of step)",
               shares[cached_w2].median, "%", "< 2", device,
               f"{wait[cached_w2] * 1e3:.1f} ms per step (the epoch's first batch: {first[cached_w2] * 1e3:.0f} "
               f"ms); the workers had a step's time to build each batch", details, shares[cached_w2]),
        Result(1, "stage2_batch_wait_main_thread", "main thread reading images + rows, 0 workers (% of step)",
               shares[cached_w0].median, "%", "", device, "", details, shares[cached_w0]),
    ]


def measure(context: Context) -> tuple[dict, list[Result]]:
    raw = loader_epochs(context.plan, context)
    return raw, loader_results(context.device, raw)

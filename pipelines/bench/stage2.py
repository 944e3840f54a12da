"""Stage 2: the training step with every cache, with none (student only), and with the vision agents run live.

Steps are fed batches of random pixels over the cached keys (`step_batches`); each variant is a `Trainer`, the
live ones with the vision agents run on the batch's pixels instead of read (`LiveTeachersTrainer`). Memory is
the peak of each variant in a fresh process (`pipelines.bench_workers memory`), step by step.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.config import PromptConfig, StudentConfig
from distill.data import CLIP_MEAN, CLIP_STD, TeacherBank
from distill.trainer import RunConfig, Trainer
from extract.families.vision import normalise_pixels
from pipelines.bench.agents import register_tiny, vision_runtimes
from pipelines.bench.fixtures import cache_keys, classnames, open_bank
from pipelines.bench.harness import Context, Spread, interleaved, median, ratio_spread, run_worker
from pipelines.bench.plans import ALL_AGENTS, BENCH_DATASET, VARIANTS, VISION_AGENTS, Plan, Shapes
from pipelines.bench.report import Result


def live_vision_inputs(runtimes: dict, pixels01, official: bool) -> tuple[dict, dict]:
    """Run the vision agents on [0, 1] pixels: ({agent: unit tokens [B, L, T, D]}, {agent: token means [B, L, D]}).

    official=False is stage 1's own code (`VisionRuntime.encode`: no_grad, weights frozen). official=True runs
    the same block outputs with autograd on and every teacher weight requiring grad, as the official trainer does
    (reference §3.1): backward then runs through the four teachers and fills their (never used) .grad."""
    tokens, means = {}, {}
    for name, runtime in runtimes.items():
        runtime.model.requires_grad_(official)
        pixels = normalise_pixels(pixels01, runtime)
        if official:
            with torch.enable_grad():
                grids = runtime.block_outputs(pixels.to(runtime.device, runtime.model.dtype)).float()
            batch, layers, grid, _, dim = grids.shape
            if grid != runtime.grid:
                raise ValueError(f"agent {name}: grid {grid} != student grid {runtime.grid}")
            values = grids.reshape(batch, layers, grid * grid, dim)
        else:
            values = runtime.encode(pixels)
        tokens[name] = F.normalize(values, dim=-1)
        means[name] = tokens[name].mean(dim=2)
    return tokens, means


class LiveTeachersTrainer(Trainer):
    """The training step with the vision agents run on each batch instead of read from their caches.

    Everything else (student, gates, losses, optimiser, the other agents' caches) is `Trainer`'s own."""

    def __init__(self, *args, runtimes: dict, official: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtimes, self.official = runtimes, official
        self._other_agents = dataclasses.replace(self.bank, vision={})
        self._pixels = None

    def step(self, pixels, labels, batch):
        self._pixels = pixels
        return super().step(pixels, labels, batch)

    def teacher_inputs(self, keys, views):
        bank, self.bank = self.bank, self._other_agents   # every cache but the vision ones ...
        try:
            inputs = super().teacher_inputs(keys, views)
        finally:
            self.bank = bank
        mean = self._pixels.new_tensor(self.mean).view(1, 3, 1, 1)
        std = self._pixels.new_tensor(self.std).view(1, 3, 1, 1)
        pixels01 = self._pixels * std + mean  # ... and the vision agents on the student's own pixels
        inputs["vision_tokens"], inputs["vision_token_means"] = live_vision_inputs(self.runtimes, pixels01,
                                                                                   self.official)
        return inputs


def build_trainers(plan: Plan, cache_root: Path, device: str, run_dir: Path, variants=VARIANTS,
                   image_root: Path | None = None, workers: int = 0) -> dict:
    """One `Trainer` per variant: student (no agents), cached (every cache), live-nograd, live-official.

    Without `image_root` the trainers get no keys: the bench feeds batches to `step` itself. With it they train
    on the cached keys, whose images lie under `image_root`, through their own loader with `workers`."""
    shapes = plan.shapes
    register_tiny(shapes)
    names = classnames(shapes)
    bank = open_bank(cache_root, shapes)
    runtimes = vision_runtimes(shapes, device) if any(v.startswith("live") for v in variants) else {}
    keys = cache_keys(plan.cache_rows) if image_root is not None else []
    labels = [index % shapes.classes for index in range(len(keys))]
    trainers = {}
    for variant in variants:
        config = RunConfig(dataset=BENCH_DATASET, protocol="base2novel", shots=16, seed=1,
                           agents=() if variant == "student" else tuple(ALL_AGENTS),
                           prompts=PromptConfig(depth_vision=min(9, shapes.layers), depth_text=min(9, shapes.layers)),
                           student=StudentConfig(shapes.student_model, None), device=device, workers=workers)
        args = (config, keys, labels, names, image_root or run_dir)
        if variant == "student":
            trainers[variant] = Trainer(*args, TeacherBank(names), run_dir, progress=False)
        elif variant == "cached":
            trainers[variant] = Trainer(*args, bank, run_dir, progress=False)
        elif variant in ("live-nograd", "live-official"):
            trainers[variant] = LiveTeachersTrainer(*args, bank, run_dir, progress=False, runtimes=runtimes,
                                                    official=variant == "live-official")
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return trainers


def step_batches(plan: Plan, count: int, seed: int = 0) -> list[tuple]:
    """`count` training batches (pixels, labels, [(key, view, label)]) over the cached keys, random pixels."""
    shapes = plan.shapes
    keys = cache_keys(plan.cache_rows)
    rng = np.random.default_rng(seed)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    batches = []
    for _ in range(count):
        rows = rng.choice(len(keys), size=shapes.batch, replace=False)
        labels = rng.integers(0, shapes.classes, size=shapes.batch)
        pixels01 = torch.from_numpy(rng.random((shapes.batch, 3, shapes.image_size, shapes.image_size),
                                               dtype=np.float32))
        batches.append(((pixels01 - mean) / std, torch.from_numpy(labels),
                        [(keys[r], 0, int(label)) for r, label in zip(rows, labels, strict=True)]))
    return batches


def measure(context: Context) -> tuple[dict, list[Result]]:
    """Item 1's memory and item 2: peak memory per variant in fresh processes, then the interleaved steps of the
    cached and the live variants."""
    run_dir = context.scratch / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    memory = memory_in_fresh_processes(context.plan, context.cache_root, context.device, run_dir)
    timing = live_timing(context.plan, context.cache_root, context.device, run_dir)
    return ({"timing": timing, "memory": memory},
            stage2_results(context.device, context.plan.shapes, timing, memory))


def live_timing(plan: Plan, cache_root: Path, device: str, run_dir: Path) -> dict:
    """Item 2: the cached step against both live variants, interleaved over `plan.reps` rounds after each
    variant's warm-up, and the cached step's teacher read on its own."""
    variants = ("cached", "live-nograd", "live-official")
    trainers = build_trainers(plan, cache_root, device, run_dir, variants)
    batches = step_batches(plan, len(variants) * (plan.warmup + plan.reps))

    def step(variant):
        return lambda index: trainers[variant].step(*batches[index])

    seconds = interleaved({v: step(v) for v in variants}, plan.reps, {v: plan.warmup for v in variants})
    cached = trainers["cached"]
    fetch = []
    for _, _, batch in batches[:3]:
        start = time.perf_counter()
        cached.teacher_inputs([key for key, _, _ in batch], [view for _, view, _ in batch])
        fetch.append(time.perf_counter() - start)
    return {"seconds": seconds, "fetch_seconds": fetch, "warmup": plan.warmup, "rounds": plan.reps,
            "gate_parameters": sum(p.numel() for p in cached.gates.parameters())}


def memory_in_fresh_processes(plan: Plan, cache_root: Path, device: str, run_dir: Path) -> dict:
    """Peak memory of each variant, each in its own process (`python -m pipelines.bench_workers memory`)."""
    out = {}
    for variant in plan.memory_variants:
        out[variant] = run_worker(["memory", "--plan", plan.name, "--variant", variant, "--cache-root",
                                   str(cache_root), "--device", device, "--steps", str(plan.memory_steps),
                                   "--run-dir", str(run_dir)])
    return out


def vision_row_bytes(shapes: Shapes) -> int:
    """One cached vision row: fp16 tokens [L, T, D] + fp32 token means [L, D] + the view (5 x int32)."""
    return shapes.layers * shapes.tokens * shapes.width * 2 + shapes.layers * shapes.width * 4 + 20


def teacher_batch_bytes(shapes: Shapes) -> int:
    """Vision-agent rows of one batch as the cached step holds them: fp16 tokens + float32 token means."""
    per_agent = shapes.batch * shapes.layers * shapes.width * (shapes.tokens * 2 + 4)
    return per_agent * len(VISION_AGENTS)

def stage2_results(device: str, shapes: Shapes, timing: dict, memory: dict) -> list[Result]:
    live = timing["seconds"]
    peaks = {v: memory[v]["peak_bytes"] for v in memory}
    unit_mem = memory_unit(device)
    gates_bytes = timing["gate_parameters"] * 4 * 3   # weights, grads, momentum in float32
    details = {"median_step_seconds": {v: median(s) for v, s in live.items()},
               "median_peak_bytes": {v: median(p) for v, p in peaks.items()},
               "cache_fetch_seconds": median(timing["fetch_seconds"]), "rounds": timing["rounds"],
               "warmup": timing["warmup"], "memory_steps": next(iter(memory.values()))["steps"],
               "gate_parameters": timing["gate_parameters"], "gates_bytes": gates_bytes,
               "teacher_rows_bytes": teacher_batch_bytes(shapes)}

    def share(a, b) -> Spread | None:
        return ratio_spread(peaks[a], peaks[b]) if a in peaks and b in peaks else None

    def gb(variant):
        return f"{median(peaks[variant]) / 1e9:.2f} GB" if variant in peaks else "not measured"

    def result(item, key, label, spread, target, reason):
        return Result(item, key, label, spread.median if spread else None, "x", target, device, reason, details,
                      spread)

    live_cached = median(live["cached"])
    teachers = {v: median(live[v]) - live_cached for v in ("live-nograd", "live-official")}
    without_gates = None
    if "cached" in peaks and "student" in peaks:
        without_gates = ratio_spread([peak - gates_bytes for peak in peaks["cached"]], peaks["student"])
    return [
        result(1, "stage2_memory_overhead", f"stage-2 step, all caches / student-only ({unit_mem})",
               share("cached", "student"), "<= 1.10", memory_breakdown(peaks, details)),
        result(1, "stage2_memory_without_gates", "same, less the gates' weights, grads and momentum",
               without_gates, "", ""),
        result(2, "live_official_speedup", "live teachers, official style (autograd) / cached (time)",
               ratio_spread(live["live-official"], live["cached"]), ">= 3.5",
               f"the four teachers' forward + backward added {teachers['live-official']:.2f} s to a "
               f"{live_cached:.2f} s step: the student step is the larger cost on this device"),
        result(2, "live_nograd_speedup", "live teachers under no_grad / cached (time)",
               ratio_spread(live["live-nograd"], live["cached"]), ">= 1.6",
               f"the four no_grad teacher forwards added {teachers['live-nograd']:.2f} s to a {live_cached:.2f} s "
               "step (a target of 1.6 needs 0.6 of a step)"),
        result(2, "cached_vs_official_memory", f"cached / live official-style ({unit_mem})",
               share("cached", "live-official"), "<= 0.55",
               f"{gb('cached')} vs {gb('live-official')}: the student's own weights and activations dominate both"),
    ]


def memory_breakdown(peaks: dict, details: dict) -> str:
    """Where the cached step's extra memory goes: the gates (the method's size), the batch's rows, the rest."""
    if "cached" not in peaks or "student" not in peaks:
        return ""
    extra = median(peaks["cached"]) - median(peaks["student"])
    gates, rows = details["gates_bytes"], details["teacher_rows_bytes"]
    return (f"{median(peaks['cached']) / 1e9:.2f} GB vs {median(peaks['student']) / 1e9:.2f} GB: of the "
            f"{extra / 1e6:.0f} MB more, {gates / 1e6:.0f} MB are the gates' weights, grads and momentum (12 MLP "
            f"gates of 256 hidden units on 4 x 768 inputs: the method's own size), {rows / 1e6:.0f} MB the batch's "
            f"agent rows (fp16 as cached) and {(extra - gates - rows) / 1e6:.0f} MB the rest: the L_VAC terms' "
            "activations kept for backward (every block's patch tokens through the gates)")


def memory_unit(device: str) -> str:
    return "GPU max allocated" if device.startswith("cuda") else "peak anonymous RSS"

"""Stage 2: the training step with every cache, with none (student only), and with the vision agents run live."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from pipelines.bench.agents import register_tiny, vision_runtimes
from pipelines.bench.fixtures import cache_keys, classnames, open_bank
from pipelines.bench.harness import interleaved, median, ratio, run_worker, synchronizer
from pipelines.bench.plans import ALL_AGENTS, BENCH_DATASET, VARIANTS, VISION_AGENTS, Plan, Shapes
from pipelines.bench.report import Result


def live_vision_inputs(runtimes: dict, pixels01, official: bool) -> tuple[dict, dict]:
    """Run the vision agents on [0, 1] pixels: ({agent: unit tokens [B, L, T, D]}, {agent: token means [B, L, D]}).

    official=False is stage 1's own code (`VisionRuntime.encode`: no_grad, weights frozen). official=True runs
    the same block outputs with autograd on and every teacher weight requiring grad, as the official trainer does
    (reference §3.1): backward then runs through the four teachers and fills their (never used) .grad."""
    import torch
    import torch.nn.functional as F

    from extract.families.vision import normalise_pixels

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


def _live_trainer_class():
    from distill.trainer import Trainer

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

    return LiveTeachersTrainer


def build_trainers(plan: Plan, cache_root: Path, device: str, run_dir: Path, variants=VARIANTS) -> dict:
    """One `Trainer` per variant: student (no agents), cached (every cache), live-nograd, live-official."""
    from distill.data import TeacherBank
    from distill.config import PromptConfig, StudentConfig
    from distill.trainer import RunConfig, Trainer

    shapes = plan.shapes
    register_tiny(shapes)
    names = classnames(shapes)
    bank = open_bank(cache_root, shapes)
    runtimes = vision_runtimes(shapes, device) if any(v.startswith("live") for v in variants) else {}
    live_class = _live_trainer_class()
    trainers = {}
    for variant in variants:
        config = RunConfig(dataset=BENCH_DATASET, protocol="base2novel", shots=16, seed=1,
                           agents=() if variant == "student" else tuple(ALL_AGENTS),
                           prompts=PromptConfig(depth_vision=min(9, shapes.layers), depth_text=min(9, shapes.layers)),
                           student=StudentConfig(shapes.student_model, None), device=device)
        # no keys: the bench feeds batches to `step` itself, so no image is read (image_root is unused)
        args = (config, [], [], names, run_dir)
        if variant == "student":
            trainers[variant] = Trainer(*args, TeacherBank(names), run_dir, progress=False)
        elif variant == "cached":
            trainers[variant] = Trainer(*args, bank, run_dir, progress=False)
        elif variant in ("live-nograd", "live-official"):
            trainers[variant] = live_class(*args, bank, run_dir, progress=False, runtimes=runtimes,
                                           official=variant == "live-official")
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return trainers


def step_batches(plan: Plan, count: int, seed: int = 0) -> list[tuple]:
    """`count` training batches (pixels, labels, [(key, view, label)]) over the cached keys, random pixels."""
    import torch

    from distill.data import CLIP_MEAN, CLIP_STD

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
                        [(keys[r], 0, int(label)) for r, label in zip(rows, labels)]))
    return batches


def stage2_timing(plan: Plan, cache_root: Path, device: str, run_dir: Path) -> dict:
    """Item 1 (student-only vs cached, interleaved), item 2 (cached vs both live variants, interleaved), and the
    cached step's cache fetch on its own."""
    cuda = device.startswith("cuda")
    warmup, live_warmup = (plan.gpu_warmup, plan.gpu_warmup) if cuda else (plan.warmup, plan.live_warmup)
    reps, live_reps = (plan.gpu_reps, plan.gpu_reps) if cuda else (plan.reps, plan.live_reps)
    trainers = build_trainers(plan, cache_root, device, run_dir)
    batches = step_batches(plan, 2 * warmup + 2 * live_warmup + 3 * max(reps, live_reps))
    sync = synchronizer(device)

    def step(variant):
        return lambda index: trainers[variant].step(*batches[index])

    overhead = interleaved({v: step(v) for v in ("student", "cached")}, reps,
                           {"student": warmup, "cached": warmup}, sync)
    live = interleaved({v: step(v) for v in ("cached", "live-nograd", "live-official")}, live_reps,
                       {"live-nograd": live_warmup, "live-official": live_warmup}, sync)
    cached = trainers["cached"]
    fetch = []
    for _, _, batch in batches[:3]:
        sync()
        start = time.perf_counter()
        cached.teacher_inputs([key for key, _, _ in batch], [view for _, view, _ in batch])
        sync()
        fetch.append(time.perf_counter() - start)
    return {"overhead_seconds": overhead, "live_seconds": live, "fetch_seconds": fetch,
            "warmup": {"student": warmup, "cached": warmup, "live": live_warmup}, "rounds": [reps, live_reps],
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
    overhead, live = timing["overhead_seconds"], timing["live_seconds"]
    med = {v: median(overhead[v] if v in overhead else live[v]) for v in VARIANTS}
    cuda = device.startswith("cuda")
    mem_key = "peak_gpu_allocated_bytes" if cuda else "peak_anon_rss_bytes"
    mem = {v: memory[v][mem_key] if v in memory else None for v in VARIANTS}
    unit_mem = "GPU max allocated" if cuda else "peak anonymous RSS"
    fetch = median(timing["fetch_seconds"])
    rows_mb = teacher_batch_bytes(shapes) / 1e6
    gates_mb = timing["gate_parameters"] * 4 * 3 / 1e6   # weights, grads, momentum
    details = {"median_step_seconds": med, mem_key: mem, "cache_fetch_seconds": fetch, "rounds": timing["rounds"],
               "warmup": timing["warmup"], "memory_steps": next(iter(memory.values()))["steps"],
               "gate_parameters": timing["gate_parameters"]}

    def share(a, b):
        return mem[a] / mem[b] if mem[a] is not None and mem[b] is not None else None

    def gb(variant):
        return f"{mem[variant] / 1e9:.2f} GB" if mem[variant] is not None else "not measured"

    live_cached = median(live["cached"])
    teachers = {v: median(live[v]) - live_cached for v in ("live-nograd", "live-official")}
    return [
        Result(1, "stage2_time_overhead", "stage-2 step, all caches / student-only (time)",
               ratio(overhead["cached"], overhead["student"]), "x", "<= 1.10", device,
               f"{med['cached']:.2f} s vs {med['student']:.2f} s: the cached step adds the cache fetch "
               f"({fetch * 1e3:.0f} ms), the gates and the L_VAC terms over {shapes.layers} layers x "
               f"{len(VISION_AGENTS)} agents, which the student-only step (CE only) does not compute", details),
        Result(1, "stage2_memory_overhead", f"stage-2 step, all caches / student-only ({unit_mem})",
               share("cached", "student"), "x", "<= 1.10", device,
               f"{gb('cached')} vs {gb('student')}: the cached step holds the batch's agent rows "
               f"({rows_mb:.0f} MB, fp16 as cached), the gates' weights, grads and momentum ({gates_mb:.0f} MB: "
               f"12 MLP gates with 256 hidden units on 4 x 768 inputs) and the L_VAC graph over every block's "
               f"patch tokens",
               details),
        Result(2, "live_official_speedup", "live teachers, official style (autograd) / cached (time)",
               ratio(live["live-official"], live["cached"]), "x", ">= 3.5", device,
               f"the four teachers' forward + backward added {teachers['live-official']:.2f} s to a "
               f"{live_cached:.2f} s step: the student step is the larger cost on this device", details),
        Result(2, "live_nograd_speedup", "live teachers under no_grad / cached (time)",
               ratio(live["live-nograd"], live["cached"]), "x", ">= 1.6", device,
               f"the four no_grad teacher forwards added {teachers['live-nograd']:.2f} s to a {live_cached:.2f} s "
               "step (a target of 1.6 needs 0.6 of a step)", details),
        Result(2, "cached_vs_official_memory", f"cached / live official-style ({unit_mem})",
               share("cached", "live-official"), "x", "<= 0.55", device,
               f"{gb('cached')} vs {gb('live-official')}: the student's own weights and activations dominate both",
               details),
    ]

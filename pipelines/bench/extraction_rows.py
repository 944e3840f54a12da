"""Extraction figures: the per-row work around a vision agent's forward, stage by stage, and extraction ÷ forward.

A DINO ViT-B/16 with random weights at its real shapes (224 px, 197 tokens x 768, 12 blocks, rows stored as float16;
nothing is downloaded) extracts rows from JPEGs of 320 x 240, two views each. Each stage is timed on its own, in
this thread, with the calls the runner makes, over one batch per repetition:

    loader worker   decode      `load_rgb`, once per image (its cost shared by the image's views)
                    view        `view_params` + `apply_view` to the student's size
                    normalise   the agent's mean/std, per byte from a table (`normalise_bytes`)
    writer thread   fp16        `vision.finish`: the float32 unit tokens cast to the cache's float16
                    hash        sha256 of each array's row bytes, as `SegmentWriter` journals them
                    write       `SegmentWriter.write` (chunk files + journal lines) less its hashing

The model's thread runs the forward and the token post-processing (L2 normalisation and token means, on the
agent's device); the latter is reported apart, as `model_thread_ms_per_row`.

The ratio is extraction rows/s ÷ bare-forward rows/s: `run_agent` over the rows (model already built; `steady`
counts its computing and writing, `whole_run` adds creating, finalising and freeing the cache's agent) against
`block_outputs` on the same batches, inputs made beforehand. The two run interleaved, A B then B A, for at least 5
rounds after one warm-up each; the figure is the median and the min-max of the per-round ratios. A target inside
a figure's min-max is "within noise", not pass or miss.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTModel

from cache_schema import AgentCache
from cache_schema.student import StudentGrid
from cache_schema.views import apply_view, load_rgb, view_params
from extract.agents import get_agent
from extract.agents.base import LoadRequest, Source
from extract.agents.dino import DinoRuntime
from extract.families import ExtractContext
from extract.families import vision
from extract.runner import AgentJob, needed_rows, run_agent
from pipelines.bench.harness import Spread
from pipelines.bench.report import Result

TARGET_MS_PER_ROW = 10.0          # the per-row work outside the forward, for a ViT-B/16 vision row
LOADER_STAGES = ("decode", "view", "normalise")
WRITER_STAGES = ("fp16", "hash", "write")
OPENMP_SPIN_SECONDS = 0.03        # OpenMP's workers spin this long (at most) after a torch op before they sleep


@dataclass(frozen=True)
class Shapes:
    """A ViT agent and the images it reads."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp: int
    source_size: tuple[int, int]     # (width, height) of the JPEGs

    def config(self) -> ViTConfig:
        return ViTConfig(hidden_size=self.width, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                         intermediate_size=self.mlp, image_size=self.image_size, patch_size=self.patch_size,
                         qkv_bias=True, layer_norm_eps=1e-6)

    def student(self) -> StudentGrid:
        return StudentGrid("ViT-B-16", None, self.image_size, self.patch_size, self.width, self.layers)


VIT_B16 = Shapes(224, 16, 768, 12, 12, 3072, (320, 240))
TINY = Shapes(32, 8, 32, 2, 2, 64, (48, 40))


@dataclass(frozen=True)
class Settings:
    rows: int       # rows per extraction (images x 2 views)
    batch: int
    reps: int       # timed rounds (after one warm-up round)


FULL, QUICK = Settings(rows=32, batch=8, reps=7), Settings(rows=8, batch=4, reps=5)


def extraction_figures(quick: bool = False, shapes: Shapes = VIT_B16, work: Path | None = None,
                       settings: Settings | None = None) -> dict:
    """The figures as a JSON-ready dict: ms per row per stage (median, min, max), their total against the target,
    the model thread's post-processing, and extraction ÷ bare forward with the spread of its paired ratios."""
    settings = settings or (QUICK if quick else FULL)
    if settings.reps < 5:
        raise ValueError(f"a ratio needs at least 5 rounds to show its spread, got reps={settings.reps}")
    with tempfile.TemporaryDirectory(prefix="bench-extraction-") as scratch:
        work = Path(work or scratch)
        torch.manual_seed(0)
        runtime = DinoRuntime(ViTModel(shapes.config(), add_pooling_layer=False), shapes.student(),
                              mean=vision.IMAGENET_MEAN, std=vision.IMAGENET_STD)
        job = _job(runtime, shapes, work / "images", settings)
        stages, cpu = stage_costs(runtime, job, work / "stages", settings.reps)
        ratio = extraction_vs_forward(runtime, job, work / "caches", settings.reps)
    total = spread(_totals(stages))
    total["cpu_median"] = statistics.median(_totals(cpu))
    return {
        "shapes": {**dataclasses.asdict(shapes), "tokens": (shapes.image_size // shapes.patch_size) ** 2 + 1,
                   "stored_dtype": "float16"},
        "rows": settings.rows, "batch": settings.batch, "reps": settings.reps,
        "stages_ms_per_row": {name: {**spread(stages[name]), "cpu_median": statistics.median(cpu[name]),
                                     "thread": _thread(name)} for name in (*LOADER_STAGES, *WRITER_STAGES)},
        "outside_forward_ms_per_row": total,
        "target_ms_per_row": TARGET_MS_PER_ROW,
        "target": verdict(total, TARGET_MS_PER_ROW),
        "model_thread_ms_per_row": {name: {**spread(stages[name]), "cpu_median": statistics.median(cpu[name])}
                                    for name in ("post", "forward")},
        "extraction_vs_forward": ratio,
        "load_average": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def stage_costs(runtime, job: AgentJob, root: Path, reps: int) -> tuple[dict[str, list[float]], dict]:
    """ms per row of each stage over one batch, per repetition (the first of reps + 1 is a warm-up, dropped): wall
    time, and CPU time of this process (all its threads; other processes' load does not count)."""
    ctx = job.ctx
    rows = needed_rows(job)[:ctx.batch_size]
    keys = sorted({key for key, _ in rows})
    specs = vision.arrays(runtime, ctx)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    @contextmanager
    def stage(name):
        start, start_cpu = time.perf_counter(), time.process_time()
        yield
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000 / len(rows))
        cpu.setdefault(name, []).append((time.process_time() - start_cpu) * 1000 / len(rows))

    for rep in range(reps + 1):
        with stage("decode"):
            images = {key: load_rgb(ctx.image_path(key)) for key in keys}
        with stage("view"):
            views = [view_params(key, view, images[key].width, images[key].height, ctx.view_spec)
                     for key, view in rows]
            pixels = [np.asarray(apply_view(images[key], box, ctx.student.image_size), np.uint8)
                      for (key, _), box in zip(rows, views, strict=True)]
        with stage("normalise"):
            inputs = vision.normalise_bytes(np.stack(pixels), runtime)
        with stage("forward"), torch.no_grad():
            encoded = runtime.encode(inputs)
        with stage("post"):
            tokens = _post(encoded)
        with stage("fp16"):
            stored = vision.finish({**tokens, "views": np.stack(views).astype(np.int32)}, ctx)
        time.sleep(OPENMP_SPIN_SECONDS)   # the cast's OpenMP workers go idle: hash and write are not charged for them
        with stage("hash"):
            for value in stored.values():
                for row in value:
                    hashlib.sha256(np.ascontiguousarray(row)).hexdigest()
        cache = AgentCache.open(root, ctx.dataset, "dino", {"rep": rep}, specs)
        (segment, local), = cache.plan([(f"row/{i}", 0) for i in range(len(rows))])[0]
        cache.create_segments()
        with cache.segment_writer(segment) as writer, stage("write"):
            writer.write(local, stored)
        shutil.rmtree(cache.path)   # its pages are dropped, not written back: later writes find no dirty backlog
        for measured in (times, cpu):
            measured["write"][-1] -= measured["hash"][-1]     # SegmentWriter.write hashes as it writes
    return {name: values[1:] for name, values in times.items()}, {name: values[1:] for name, values in cpu.items()}


def _totals(stages: dict[str, list[float]]) -> list[float]:
    """Per repetition, the sum of the stages around the forward (loader worker and writer thread)."""
    return [sum(rep) for rep in zip(*(stages[name] for name in (*LOADER_STAGES, *WRITER_STAGES)), strict=True)]


def _post(encoded) -> dict[str, np.ndarray]:
    """The model thread's work after the forward, as `vision.compute` does it (every layer kept, no pooling)."""
    tokens = F.normalize(encoded, dim=-1)
    return {"token_mean": tokens.mean(dim=2).cpu().numpy(), "tokens": tokens.cpu().numpy()}


def extraction_vs_forward(runtime, job: AgentJob, root: Path, reps: int) -> dict:
    """Extraction rows/s ÷ bare-forward rows/s, paired per round: `run_agent` over the job's rows (the model already
    built) against `block_outputs` on the same batches. `steady` counts the rows' computing and writing
    (`AgentReport.compute_seconds`); `whole_run` adds the per-agent costs (cache creation, finalising, freeing)."""
    ordered = needed_rows(job)
    batches = [vision.prepare(runtime, ordered[start:start + job.ctx.batch_size], job.ctx)[0]
               for start in range(0, len(ordered), job.ctx.batch_size)]
    computing = []

    def extract():
        report = run_agent(job, root, progress=False)
        if report.status != "done" or report.rows != len(ordered):
            raise RuntimeError(f"the benchmark extraction did not write its {len(ordered)} rows: {report}")
        computing.append(report.compute_seconds)

    def forward():
        with torch.no_grad():
            for pixels in batches:
                runtime.block_outputs(pixels)

    seconds = interleaved({"extract": extract, "forward": forward}, reps, after=lambda: shutil.rmtree(root, True))
    steady = [b / a for a, b in zip(computing[1:], seconds["forward"], strict=True)]
    whole = [b / a for a, b in zip(seconds["extract"], seconds["forward"], strict=True)]
    return {"steady": {**spread(steady), "ratios": steady}, "whole_run": {**spread(whole), "ratios": whole},
            "extract_seconds": seconds["extract"], "compute_seconds": computing[1:],
            "forward_seconds": seconds["forward"], "rows": len(ordered)}


def interleaved(runs: dict, reps: int, after=lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant: one warm-up call each, then `reps` rounds in order, reversed on odd
    rounds (A B, B A, ...), so a machine that slows down slows both sides of each round's ratio. `after` runs,
    untimed, after every call."""
    names = list(runs)
    for name in names:
        runs[name]()
        after()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(reps):
        for name in names if round_number % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            after()
    return times


def measure(context) -> tuple[dict, list]:
    """The `transagent bench` section: the per-row CPU work outside the forward (ViT-B/16 vision row) and the
    extraction / bare forward ratio, at the quick plan's size unless the plan is the full one."""
    if not context.plan.row_costs:
        return {"skipped": f"the {context.plan.name} plan measures no row costs"}, []
    figures = extraction_figures(quick=context.plan.name != "full", work=context.scratch / "extraction-rows")
    total, ratio = figures["outside_forward_ms_per_row"], figures["extraction_vs_forward"]["steady"]
    stages = ", ".join(f"{name} {figure['median']:.2f}" for name, figure in figures["stages_ms_per_row"].items())
    return figures, [
        Result(3, "extract_row_cpu_ms", "extraction CPU work per ViT-B/16 row outside the forward (loader workers "
               "+ writer thread)", total["median"], "ms", f"<= {TARGET_MS_PER_ROW:g}", "cpu",
               f"ms per row by stage: {stages}", {"min": total["min"], "max": total["max"]},
               Spread.of([total["min"], total["median"], total["max"]])),
        Result(3, "extract_rows_vs_forward", "extraction rows/s / bare forward rows/s (steady state)",
               ratio["median"], "x", "", "cpu", "", {"ratios": ratio["ratios"]}, Spread.of(ratio["ratios"])),
    ]


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def verdict(figure: dict, target: float) -> str:
    """ "pass" / "miss" when the whole min-max lies on one side of the target, else "within noise"."""
    if figure["max"] <= target:
        return "pass"
    if figure["min"] > target:
        return "miss"
    return "within noise"


def format_figures(figures: dict) -> str:
    """A short table of the figures, for the terminal."""
    lines = [f"extraction, ms per row ({figures['rows']} rows, batch {figures['batch']}, {figures['reps']} rounds; "
             "wall median [min-max], CPU median)"]
    for name, figure in figures["stages_ms_per_row"].items():
        lines.append(f"  {name:<10} {figure['thread']:<14} {_range(figure)}")
    total = figures["outside_forward_ms_per_row"]
    lines.append(f"  {'total':<10} {'':<14} {_range(total)}  target <= {figures['target_ms_per_row']:g}: "
                 f"{figures['target']}")
    model = figures["model_thread_ms_per_row"]
    lines.append(f"  {'post':<10} {'model thread':<14} {_range(model['post'])}  (forward {_range(model['forward'])})")
    ratio = figures["extraction_vs_forward"]
    for name in ("steady", "whole_run"):
        figure = ratio[name]
        lines.append(f"  extraction / bare forward, rows/s, {name.replace('_', ' '):<9} {figure['median']:.3f}x "
                     f"[{figure['min']:.3f}-{figure['max']:.3f}] over {len(figure['ratios'])} rounds")
    return "\n".join(lines)


def _range(figure: dict) -> str:
    cpu = f"  cpu {figure['cpu_median']:.2f}" if "cpu_median" in figure else ""
    return f"{figure['median']:8.2f} [{figure['min']:.2f}-{figure['max']:.2f}]{cpu}"


def _thread(stage: str) -> str:
    return "loader worker" if stage in LOADER_STAGES else "writer thread"


def _job(runtime, shapes: Shapes, image_root: Path, settings: Settings) -> AgentJob:
    """An extraction job of `settings.rows` rows (2 views per image) whose loader returns `runtime`."""
    keys = write_images(image_root, max(1, settings.rows // 2), shapes.source_size)
    spec = dataclasses.replace(get_agent("dino"), load=lambda request: runtime,
                               source=Source(note="bench: random weights at the agent's shapes"))
    student = shapes.student()
    ctx = ExtractContext(dataset="bench", image_root=image_root, keys=keys, classnames=["a", "b"],
                         template="a photo of a {}.", student=student, split_hash="bench-extraction", views=2,
                         batch_size=settings.batch)
    return AgentJob(spec, ctx, LoadRequest(tiny=False, student=student))


def write_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """`count` JPEGs of smooth gradients plus noise (they compress and decode like photographs); their keys."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for index in range(count):
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(80, 220, 3)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        keys.append(f"{index:05d}.jpg")
        Image.fromarray(pixels).save(root / keys[-1], quality=90)
    return keys

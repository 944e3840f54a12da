"""Extraction: `run_agent` against the bare forward on the same batches, and a repeated `extract` over a complete
cache in a fresh process."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache_schema import apply_view, view_params
from extract.agents.base import LoadRequest
from extract.families import ExtractContext
from extract.families.vision import normalise_pixels
from extract.runner import AgentJob, needed_rows, run_agent
from pipelines.bench.agents import agent_dtype, agent_spec
from pipelines.bench.fixtures import classnames, student_info, write_images
from pipelines.bench.harness import Context, Spread, interleaved, median, ratio_spread, run_worker, synchronizer
from pipelines.bench.plans import BENCH_DATASET, BENCH_SPLIT, TEMPLATE, Plan, Shapes
from pipelines.bench.report import Result
from pipelines.bench.stage2 import vision_row_bytes
from pipelines.cli import main
from pipelines.datasets import make_synthetic


def measure(context: Context) -> tuple[dict, list[Result]]:
    """Item 3: one vision agent's extraction against its bare forward."""
    raw = extraction_vs_forward(context.plan, context.scratch / "extract", context.device)
    return raw, extraction_results(context.device, raw)


def measure_repeat(context: Context) -> tuple[dict, list[Result]]:
    """Item 3b: `extract` again over complete caches, in fresh processes."""
    raw = repeat_extract(context.plan, context.scratch / "repeat")
    return raw, repeat_results(raw)


def extract_job(spec, shapes: Shapes, image_root: Path, keys: list[str], views: int, batch: int, device: str,
                dtype: str | None = None, options: dict | None = None) -> AgentJob:
    student = student_info(shapes)
    ctx = ExtractContext(dataset=BENCH_DATASET, image_root=image_root, keys=keys, classnames=classnames(shapes),
                         template=TEMPLATE, student=student, split_hash=BENCH_SPLIT, views=views,
                         batch_size=batch, device=device, options=dict(options or {}))
    request = LoadRequest(tiny=not shapes.real, student=student, device=device, dtype=dtype or agent_dtype(device),
                          options=dict(options or {}))
    return AgentJob(spec, ctx, request)


def timed_loader(spec):
    """(spec whose loader records its own build time, the list of those times): a model build is a one-off."""
    seconds: list[float] = []

    def load(request):
        start = time.perf_counter()
        runtime = spec.load(request)
        seconds.append(time.perf_counter() - start)
        return runtime

    return dataclasses.replace(spec, load=load), seconds


def extraction_vs_forward(plan: Plan, work: Path, device: str, agent: str = "dino", dtype: str | None = None,
                          spec=None) -> dict:
    """Item 3: `run_agent` for one vision agent / its bare forward (`block_outputs`) on the same batches.

    The one-off model build is timed by wrapping the loader and reported apart; the throughput compared is the
    runner's steady state (images decoded, views cut, forward, normalise, fp16, rows written and journalled)."""
    shapes = plan.shapes
    rows, batch_size = plan.extract_rows, plan.extract_batch
    image_root = work / "extract-images"
    keys = write_images(image_root, rows // 2, (320, 240))
    base_spec = spec or agent_spec(agent, shapes)
    timed, load_seconds = timed_loader(base_spec)
    job = extract_job(timed, shapes, image_root, keys, 2, batch_size, device, dtype)
    runtime = base_spec.load(job.request)          # the bare forward's copy of the same model
    ordered = needed_rows(job)
    batches = []
    for start in range(0, len(ordered), batch_size):
        pixels = []
        for key, view in ordered[start:start + batch_size]:
            with Image.open(image_root / key) as image:
                params = view_params(key, view, image.width, image.height, job.ctx.view_spec)
                pixels.append(np.asarray(apply_view(image, params, shapes.image_size), dtype=np.uint8))
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
        batches.append(normalise_pixels(batch, runtime).to(runtime.device, runtime.model.dtype))
    sync = synchronizer(device)
    reports, roots = [], []

    def extract(index):  # a new cache root each call, removed after the timing
        reports.append(run_agent(job, work / f"extract-cache-{index}", progress=False))
        roots.append(work / f"extract-cache-{index}")

    def bare(index):
        with torch.no_grad():
            for pixels in batches:
                runtime.block_outputs(pixels)

    times = interleaved({"extract": extract, "forward": bare}, plan.reps, {"extract": 1, "forward": 1}, sync)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    # each extract call built its model once: subtract that call's own build time (warm-up call first)
    steady = [seconds - load for seconds, load in zip(times["extract"], load_seconds[1:], strict=True)]
    return {"agent": agent, "rows": rows, "batch": batch_size, "row_bytes": vision_row_bytes(shapes),
            "extract_seconds": times["extract"], "model_build_seconds": load_seconds[1:],
            "extract_steady_seconds": steady, "forward_seconds": times["forward"],
            "statuses": [r.status for r in reports], "peak_gpu_bytes": max(r.peak_gpu_bytes for r in reports)}


def repeat_extract(plan: Plan, work: Path) -> dict:
    """Item 3b: `transagent extract` again over a complete cache, each in a fresh process, against the start-up
    floor of `transagent --help` in a fresh process."""
    data, cache = work / "repeat-data", work / "repeat-cache"
    make_synthetic(data)
    agents = "dino" if plan.name == "smoke" else "all"
    args = ["extract", "--dataset", "synthetic", "--preset", "tiny", "--agents", agents, "--data-root", str(data),
            "--cache-root", str(cache)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as first_output, contextlib.redirect_stderr(io.StringIO()):
        main(args, standalone_mode=False)   # the first run computes every row
    first = time.perf_counter() - start
    again, floor, reports = [], [], []
    for _ in range(plan.repeat_runs):
        for name in ("again", "floor"):
            start = time.perf_counter()
            if name == "again":
                reports.append(run_worker(["extract-again", *args], timeout=600))
                again.append(time.perf_counter() - start)
            else:
                subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, check=True)
                floor.append(time.perf_counter() - start)
    return {"agents": agents, "first_seconds": first, "again_seconds": again, "help_seconds": floor,
            "torch_imported": any(r["torch_imported"] for r in reports),
            "transformers_imported": any(r["transformers_imported"] for r in reports),
            "first_output": first_output.getvalue(), "output": reports[-1]["output"] if reports else ""}


def extraction_results(device: str, extraction: dict) -> list[Result]:
    rows = extraction["rows"]
    extract_rate = [rows / s for s in extraction["extract_steady_seconds"]]
    forward_rate = [rows / s for s in extraction["forward_seconds"]]
    details = {"rows": rows, "batch": extraction["batch"], "extract_rows_per_second": median(extract_rate),
               "forward_rows_per_second": median(forward_rate),
               "model_build_seconds": median(extraction["model_build_seconds"]),
               "end_to_end_rows_per_second": median(rows / s for s in extraction["extract_seconds"])}
    overhead_ms = 1e3 * (1 / details["extract_rows_per_second"] - 1 / details["forward_rows_per_second"])
    spread = ratio_spread(extract_rate, forward_rate)
    return [Result(3, "extract_vs_forward", "extract images/s (dino) / bare forward images/s",
                   spread.median, "x", ">= 0.9", device,
                   f"{overhead_ms:.0f} ms of CPU work per row around the forward: image decoding and cropping, "
                   "token normalisation, the fp16 cast (torch, on the writer thread), sha256 checksums and writes of "
                   f"{extraction['row_bytes'] / 1e6:.2g} MB rows, and per-run costs (creating and finalising the "
                   f"cache, freeing the agent) over {rows} rows; " +
                   ("the GPU forward is fast next to this CPU work" if device.startswith("cuda") else
                    "on a CPU-only machine the background writer shares the cores the forward uses, so its work "
                    "adds to the forward instead of overlapping it"),
                   details, spread)]


def repeat_results(repeat: dict) -> list[Result]:
    details = {k: v for k, v in repeat.items() if not k.endswith("output")}
    details["help_median_seconds"] = median(repeat["help_seconds"])
    loaded = repeat["torch_imported"] or repeat["transformers_imported"]
    again = Spread.of(repeat["again_seconds"])
    return [
        Result(3, "repeat_extract_seconds", f"repeat `extract`, complete cache ({repeat['agents']} agents), "
               "fresh process", again.median, "s", "< 3", "cpu",
               f"Python start-up and CLI imports: `transagent --help` alone takes "
               f"{details['help_median_seconds']:.2f} s here", details, again),
        Result(3, "repeat_extract_model_loaded", "repeat `extract` imported torch or transformers",
               float(loaded), "flag", "<= 0", "cpu",
               "a complete cache must be recognised from its JSON files alone, before any model code", details),
    ]

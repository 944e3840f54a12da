"""`transagent bench --device cuda`: the GPU section, one prepared script for a lent GPU without network.

It fits 10 minutes of a lent machine (`budget_seconds`; a part that would start after the budget is skipped and
says so), and runs in order:

1. preflight: CUDA, and the libraries each part needs. The device may lack diffusers, open_clip or zarr: missing
   ones are installed from a wheel directory (`--wheels DIR` or TRANSAGENT_WHEELS) with `pip --no-index`, else
   named with the `pip download` line that fetches them, and the parts that need them are skipped;
2. stage 2 at ViT-B/16 shapes, bf16 autocast: ms per step, images/s and max_memory_allocated of student-only,
   cached, live no_grad and live official-style steps; then the trainer's own loader with 0 and 2 workers (the
   main thread's wait for a batch, share of the step);
3. extraction per agent at bf16, random weights at real shapes, every agent but the 7B ones: ms per row, rows/s,
   max_memory_allocated; vision agents against their bare forward (target >= 0.95x on a GPU).

Output: a JSON and a one-screen table to paste into an issue. Plan "smoke" runs the same code at tiny shapes on
the CPU (tests/test_bench.py), so the script is not found broken the day a GPU is lent.

Modules that import open_clip, diffusers or zarr are imported after the preflight, inside `run_gpu`.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.bench.harness import Spread, median, synchronizer
from pipelines.bench.machine import machine
from pipelines.bench.plans import TINY, VARIANTS, VISION_AGENTS, VIT_B16, Plan
from pipelines.bench.report import write_json

logger = logging.getLogger(__name__)

WHEELS_ENV = "TRANSAGENT_WHEELS"
# import name -> distribution to carry; the parts that need each
LIBRARIES = {"transformers": "transformers", "tokenizers": "tokenizers", "diffusers": "diffusers",
             "open_clip": "open_clip_torch", "ftfy": "ftfy", "regex": "regex", "zarr": "zarr", "h5py": "h5py",
             "safetensors": "safetensors"}
STAGE2_NEEDS = ("open_clip", "ftfy", "regex", "transformers", "safetensors", "zarr")   # caches are zarr
GPU_AGENTS = (*VISION_AGENTS, "bert", "gpt3", "sd", "pixart", "blip2")
LEFT_OUT = {"vicuna": "7B (LLaMA)", "shikra": "7B (LLaMA)"}


@dataclass(frozen=True)
class GpuPlan:
    name: str
    stage2: Plan          # shapes, warm-up, rounds, cache rows, loader steps, extraction rows and batch
    steps: int            # timed steps of each stage-2 variant
    images: int           # images per extraction of a non-vision agent
    budget_seconds: float
    agents: tuple[str, ...]
    variants: tuple[str, ...] = VARIANTS
    loader: bool = True   # the loader comparison (the CPU smoke run covers its code already)
    dtype: str = "bfloat16"


def _plan(name: str, shapes, **numbers) -> Plan:
    return Plan(name, shapes, memory_steps=0, read_rows=0, read_batches=0, scaling_rows=(), repeat_runs=0,
                memory_variants=(), **numbers)


GPU_PLANS = {
    "gpu": GpuPlan("gpu", _plan("gpu", VIT_B16, reps=5, warmup=3, cache_rows=32, loader_steps=8, extract_rows=128,
                                extract_batch=32), steps=10, images=32, budget_seconds=540, agents=GPU_AGENTS),
    # tiny shapes on the CPU, the GPU section's own code once: a live step over the caches, a vision and a
    # non-vision extraction (the loader comparison is the CPU run's; tests/test_bench.py builds every zoo model)
    "smoke": GpuPlan("smoke", _plan("gpu-smoke", TINY, reps=1, warmup=0, cache_rows=8, loader_steps=2,
                                    extract_rows=4, extract_batch=2), steps=1, images=2, budget_seconds=600,
                     agents=("dino", "bert"), variants=("live-official",), loader=False),
}


# ---------------------------------------------------------------------------------------------------- preflight

def missing_libraries() -> list[str]:
    return [name for name in LIBRARIES if importlib.util.find_spec(name) is None]


def preflight(wheels: Path | None) -> dict:
    """What this machine has: CUDA, the libraries (installing missing ones from `wheels`), what to carry."""
    missing = missing_libraries()
    installed = []
    if missing and wheels is not None:
        distributions = [LIBRARIES[name] for name in missing]
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                               *distributions], capture_output=True, text=True)
        if done.returncode != 0:
            logger.warning("pip could not install %s from %s:\n%s", distributions, wheels, done.stderr[-2000:])
        importlib.invalidate_caches()
        installed = [name for name in missing if importlib.util.find_spec(name) is not None]
        missing = missing_libraries()
    carry = [LIBRARIES[name] for name in missing]
    return {"cuda": torch.cuda.is_available(), "missing": missing, "installed_from_wheels": installed,
            "carry": (f"pip download -d wheels {' '.join(carry)}  (on a machine with network, for the device's "
                      f"Python {sys.version_info.major}.{sys.version_info.minor}), then transagent bench --device "
                      f"cuda --wheels wheels (or {WHEELS_ENV}=wheels)") if carry else ""}


def _lacks(found: dict, names) -> list[str]:
    return [name for name in names if name in found["missing"]]


# ---------------------------------------------------------------------------------------------------- stage 2

def stage2_steps(plan: Plan, steps: int, cache_root: Path, device: str, run_dir: Path,
                 variants=VARIANTS) -> dict:
    """Each variant on its own (built, warmed up, timed for `steps` steps, freed): ms per step, images/s,
    max_memory_allocated."""
    from pipelines.bench.stage2 import build_trainers, step_batches

    sync, cuda = synchronizer(device), device.startswith("cuda")
    out = {}
    for variant in variants:
        trainer = build_trainers(plan, cache_root, device, run_dir, [variant])[variant]
        batches = step_batches(plan, plan.warmup + steps, seed=7)
        for batch in batches[:plan.warmup]:
            trainer.step(*batch)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for batch in batches[plan.warmup:]:
            start = time.perf_counter()
            trainer.step(*batch)
            sync()
            seconds.append(time.perf_counter() - start)
        spread = Spread.of(seconds).scaled(1e3)
        out[variant] = {"ms_per_step": spread.to_dict(), "images_per_second": plan.shapes.batch / median(seconds),
                        "max_memory_allocated": int(torch.cuda.max_memory_allocated()) if cuda else None}
        del trainer
        _free(device)
    return out


def _free(device: str) -> None:
    """Give the last variant's GPU memory back before the next one is measured."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- extraction

def extraction_per_agent(gplan: GpuPlan, work: Path, device: str, found: dict, deadline: float,
                         save: Callable[[dict], None]) -> dict:
    """Every agent of the plan through `run_agent` at `gplan.dtype`; vision agents against the bare forward.
    `save(out)` after each agent: a run cut short keeps what it measured."""
    from pipelines.bench.fixtures import classnames, write_images
    from pipelines.bench.zoo import NEEDS, random_spec

    images = work / "images"
    keys = write_images(images, gplan.images, (320, 240))
    descriptions = work / "descriptions.json"
    descriptions.write_text(json.dumps({name: [f"a photo of a {name}, a kind of thing.", f"a {name}."]
                                        for name in classnames(gplan.stage2.shapes)}))
    out = {}
    for agent in gplan.agents:
        lacking = _lacks(found, ("zarr", *NEEDS.get(agent, ("transformers",))))
        if lacking or time.perf_counter() > deadline:
            out[agent] = {"skipped": f"missing {', '.join(lacking)}" if lacking else "time budget"}
            continue
        logger.info("[gpu] extraction: %s", agent)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            out[agent] = _extract_agent(gplan, random_spec(agent, gplan.stage2.shapes.real), work / agent, images,
                                        keys, device, descriptions)
        except Exception as error:  # noqa: BLE001 - one agent's failure must not lose the others' figures
            out[agent] = {"failed": f"{type(error).__name__}: {error}"[:500]}
        out[agent]["max_memory_allocated"] = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") \
            else None
        shutil.rmtree(work / agent, ignore_errors=True)
        _free(device)
        save(out)
    return out


def _extract_agent(gplan: GpuPlan, spec, work: Path, images: Path, keys: list[str], device: str,
                   descriptions: Path) -> dict:
    from extract.runner import run_agent
    from pipelines.bench.extraction import extract_job, extraction_vs_forward, timed_loader

    plan = gplan.stage2
    if spec.family == "vision":
        raw = extraction_vs_forward(plan, work, device, spec.name, gplan.dtype, spec)
        rows = raw["rows"]
        ratios = [forward / extract for forward, extract in
                  zip(raw["forward_seconds"], raw["extract_steady_seconds"], strict=True)]
        return {"rows": rows, "ms_per_row": 1e3 * median(raw["extract_steady_seconds"]) / rows,
                "forward_ms_per_row": 1e3 * median(raw["forward_seconds"]) / rows,
                "vs_forward": Spread.of(ratios).to_dict(), "statuses": raw["statuses"],
                "model_build_seconds": median(raw["model_build_seconds"])}
    timed, load_seconds = timed_loader(spec)
    options = {"descriptions": str(descriptions)} if spec.name == "gpt3" else {}
    job = extract_job(timed, plan.shapes, images, keys, 1, plan.extract_batch, device, gplan.dtype, options)
    start = time.perf_counter()
    report = run_agent(job, work / "cache", progress=False)
    seconds = time.perf_counter() - start - sum(load_seconds)
    return {"rows": report.rows, "ms_per_row": 1e3 * seconds / max(report.rows, 1), "statuses": [report.status],
            "model_build_seconds": sum(load_seconds), "error": report.error}


# ---------------------------------------------------------------------------------------------------- the script

def run_gpu(plan_name: str = "gpu", output: Path = Path("bench/gpu.json"), work_dir: Path | None = None,
            device: str = "cuda", wheels: Path | None = None) -> dict:
    """The GPU section end to end; writes `output` after every part and returns the report (its "table" is the
    one screen)."""
    gplan = GPU_PLANS[plan_name]
    started = time.perf_counter()
    wheels = wheels or (Path(os.environ[WHEELS_ENV]) if os.environ.get(WHEELS_ENV) else None)
    found = preflight(wheels)
    report = {"schema": 1, "plan": gplan.name, "device": device, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "preflight": found, "machine": machine(), "dtype": gplan.dtype,
              "shapes": gplan.stage2.shapes.describe(), "settings": dataclasses.asdict(gplan), "skipped": {}}

    def save(part: str | None = None, value=None) -> None:
        if part is not None:
            report[part] = value
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["table"] = gpu_table(report)
        write_json(output, report)

    if device.startswith("cuda") and not found["cuda"]:
        report["skipped"]["everything"] = "no CUDA device"
    else:
        _run_parts(gplan, device, found, started + gplan.budget_seconds, report, work_dir, save)
    save()
    return report


def _run_parts(gplan: GpuPlan, device: str, found: dict, deadline: float, report: dict, work_dir: Path | None,
               save: Callable) -> None:
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="transagent-gpu-bench-", dir=work_dir))
    try:
        lacking = _lacks(found, STAGE2_NEEDS)
        if lacking:
            report["skipped"]["stage2"] = f"missing {', '.join(lacking)}"
        else:
            _stage2_parts(gplan, device, deadline, report, scratch, save)
        report["extraction"] = extraction_per_agent(gplan, scratch / "extract", device, found, deadline,
                                                    lambda out: save("extraction", out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stage2_parts(gplan: GpuPlan, device: str, deadline: float, report: dict, scratch: Path, save: Callable):
    from pipelines.bench.agents import register_tiny
    from pipelines.bench.fixtures import write_student_images, write_synthetic_caches
    from pipelines.bench.harness import Context
    from pipelines.bench.loader import loader_epochs, loader_results

    plan = gplan.stage2
    register_tiny(plan.shapes)
    caches = write_synthetic_caches(scratch / "caches", plan.shapes, plan.cache_rows)
    context = Context(plan, scratch, device, scratch / "caches", caches,
                      write_student_images(scratch / "images", plan.shapes, plan.cache_rows))
    (scratch / "runs").mkdir()
    logger.info("[gpu] stage-2 steps")
    try:
        save("stage2", stage2_steps(plan, gplan.steps, context.cache_root, device, scratch / "runs", gplan.variants))
    except Exception as error:  # noqa: BLE001 - the extraction figures still come when stage 2 fails
        report["skipped"]["stage2"] = f"failed: {type(error).__name__}: {error}"[:500]
    _free(device)
    if not gplan.loader:
        return
    if time.perf_counter() > deadline:
        report["skipped"]["loader"] = "time budget"
        return
    logger.info("[gpu] stage-2 loader")
    try:
        raw = loader_epochs(plan, context)
        save("loader", {"raw": raw, "results": [r.to_dict() for r in loader_results(device, raw)]})
    except Exception as error:  # noqa: BLE001 - as above
        report["skipped"]["loader"] = f"failed: {type(error).__name__}: {error}"[:500]
    _free(device)


def gpu_table(report: dict) -> str:
    """One screen to paste into an issue."""
    info, found = report["machine"], report["preflight"]
    lines = [f"GPU section ({report['plan']}): {info.get('gpu') or report['device']}, torch {info['torch']}, "
             f"{report['dtype']}; {report['shapes']['student_model']} shapes, random weights, batch "
             f"{report['shapes']['batch']}; {report.get('seconds', 0):.0f} s"]
    if found["missing"]:
        lines.append(f"missing: {', '.join(found['missing'])}; carry: {found['carry']}")
    steps = report.get("stage2")
    if steps:
        lines += ["", f"{'stage 2 step':<18} {'ms/step (min-max)':>22} {'images/s':>9} {'max allocated':>14}"]
        for variant, row in steps.items():
            ms = row["ms_per_step"]
            lines.append(f"{variant:<18} {ms['median']:>8.1f} ({ms['low']:.1f}-{ms['high']:.1f}) "
                         f"{row['images_per_second']:>9.1f} {_gb(row['max_memory_allocated']):>14}")
    for result in (report.get("loader") or {}).get("results", []):
        spread = result["spread"]
        lines.append(f"loader: {result['label']:<62} {result['value']:.2f}{result['unit']} "
                     f"({spread['low']:.2f}-{spread['high']:.2f}) {result['verdict']}")
    extraction = report.get("extraction") or {}
    if extraction:
        lines += ["", f"{'extraction':<10} {'rows':>5} {'ms/row':>8} {'rows/s':>8} {'max allocated':>14}  "
                      "extract / bare forward"]
        for agent, row in extraction.items():
            if "skipped" in row or "failed" in row:
                lines.append(f"{agent:<10} " + (f"skipped: {row['skipped']}" if "skipped" in row else
                                                f"FAILED: {row['failed'][:100]}"))
                continue
            ratio = row.get("vs_forward")
            versus = f"{ratio['median']:.2f}x ({ratio['low']:.2f}-{ratio['high']:.2f}), target >= 0.95" if ratio \
                else ""
            rate = 1e3 / row["ms_per_row"] if row["ms_per_row"] else 0.0
            lines.append(f"{agent:<10} {row['rows']:>5} {row['ms_per_row']:>8.2f} {rate:>8.1f} "
                         f"{_gb(row['max_memory_allocated']):>14}  {versus}")
    skipped = {**LEFT_OUT, **report["skipped"]}
    lines.append("not run: " + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    return "\n".join(lines)


def _gb(value) -> str:
    return f"{value / 1e9:.2f} GB" if value else "-"


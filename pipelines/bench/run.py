"""`transagent bench`: every measurement of a plan, in order, into one JSON report."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from pipelines.bench.agents import register_tiny
from pipelines.bench.extraction import extraction_results, extraction_vs_forward, repeat_extract, repeat_results
from pipelines.bench.fixtures import write_synthetic_caches
from pipelines.bench.machine import _load_average, machine
from pipelines.bench.plans import PLANS
from pipelines.bench.reads import cache_reads, read_results
from pipelines.bench.report import Result, _json_default, format_table
from pipelines.bench.scaling import _payload_per_row, scaling, scaling_results
from pipelines.bench.stage2 import memory_in_fresh_processes, stage2_results, stage2_timing


def run_bench(plan_name: str = "full", output: Path = Path("bench/results.json"), work_dir: Path | None = None,
              devices: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every measurement of the plan, write `output` (JSON) and return it; `log` gets progress lines."""
    import tempfile

    import torch

    plan = PLANS[plan_name]
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    phases: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="transagent-bench-", dir=work_dir))

    def phase(name, function, *args):
        log(f"[bench {time.perf_counter() - started:6.0f} s] {name} ...")
        start = time.perf_counter()
        value = function(*args)
        phases[name] = round(time.perf_counter() - start, 2)
        return value

    info = machine()
    results: list[Result] = []
    raw: dict = {}
    try:
        register_tiny(plan.shapes)
        cache_root = scratch / "caches"
        caches = phase("write synthetic caches", write_synthetic_caches, cache_root, plan.shapes, plan.cache_rows)
        for device in devices:
            run_dir = scratch / f"runs-{device}"
            run_dir.mkdir(parents=True, exist_ok=True)
            memory = phase(f"memory per variant, fresh processes ({device})", memory_in_fresh_processes, plan,
                           cache_root, device, run_dir)
            timing = phase(f"stage-2 steps, interleaved ({device})", stage2_timing, plan, cache_root, device,
                           run_dir)
            raw[f"stage2_{device}"] = {"timing": timing, "memory": memory}
            results += stage2_results(device, plan.shapes, timing, memory)
            extraction = phase(f"extraction vs forward ({device})", extraction_vs_forward, plan,
                               scratch / f"extract-{device}", device)
            raw[f"extraction_{device}"] = extraction
            results += extraction_results(device, extraction)
        repeat = phase("repeat extract", repeat_extract, plan, scratch / "repeat")
        raw["repeat_extract"] = repeat
        results += repeat_results(repeat)
        reads = phase("cache reads", cache_reads, plan, caches["dino"], scratch / "reads")
        raw["cache_reads"] = reads
        results += read_results(reads)
        table = phase("scaling", scaling, plan, scratch / "scaling")
        raw["scaling"] = table
        real_row = _payload_per_row(caches["dino"]) if plan.shapes.real else None
        results += scaling_results(table, real_row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_average_at_end"] = _load_average()
    report = {"schema": 1, "plan": plan.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - started, 1), "phase_seconds": phases, "machine": info,
              "shapes": plan.shapes.describe(), "settings": dataclasses.asdict(plan) | {"devices": devices},
              "results": [r.to_dict() for r in results], "raw": raw, "table": format_table(results)}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    os.replace(temporary, output)
    return report

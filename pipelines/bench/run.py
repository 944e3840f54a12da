"""`transagent bench`: the sections of a plan, in order, into one JSON report and a one-screen table.

A section is `measure(context) -> (raw, results)`: `raw` goes to the JSON under the section's name, `results`
are the figures with their spreads and verdicts. A new measurement is one more entry in `SECTIONS`.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.bench import extraction, extraction_rows, loader, reads, scaling, stage2
from pipelines.bench.agents import register_tiny
from pipelines.bench.fixtures import write_student_images, write_synthetic_caches
from pipelines.bench.harness import Context
from pipelines.bench.machine import load_average, machine
from pipelines.bench.plans import PLANS
from pipelines.bench.report import Result, format_table, write_json

logger = logging.getLogger(__name__)

Section = Callable[[Context], tuple[dict, list[Result]]]
SECTIONS: dict[str, Section] = {
    "stage2_loader": loader.measure,
    "stage2": stage2.measure,
    "extraction": extraction.measure,
    "repeat_extract": extraction.measure_repeat,
    "extraction_rows": extraction_rows.measure,
    "cache_reads": reads.measure,
    "scaling": scaling.measure,
}


def run_bench(plan_name: str = "full", output: Path = Path("bench/results.json"), work_dir: Path | None = None,
              sections: dict[str, Section] | None = None) -> dict:
    """Run every section of the plan on the CPU, write `output` (JSON) and return it."""
    plan = PLANS[plan_name]
    sections = SECTIONS if sections is None else sections
    started = time.perf_counter()
    phases: dict[str, float] = {}
    info = machine()
    results: list[Result] = []
    raw: dict = {}
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="transagent-bench-", dir=work_dir))
    try:
        register_tiny(plan.shapes)
        logger.info("[bench %6.0f s] synthetic caches and images ...", time.perf_counter() - started)
        caches = write_synthetic_caches(scratch / "caches", plan.shapes, plan.cache_rows)
        context = Context(plan, scratch, "cpu", scratch / "caches", caches,
                          write_student_images(scratch / "images", plan.shapes, plan.cache_rows))
        for name, measure in sections.items():
            logger.info("[bench %6.0f s] %s ...", time.perf_counter() - started, name)
            start = time.perf_counter()
            raw[name], found = measure(context)
            results += found
            phases[name] = round(time.perf_counter() - start, 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_average_at_end"] = load_average()
    report = {"schema": 2, "plan": plan.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - started, 1), "phase_seconds": phases, "machine": info,
              "shapes": plan.shapes.describe(), "settings": dataclasses.asdict(plan),
              "results": [r.to_dict() for r in results], "raw": raw, "table": format_table(results)}
    write_json(output, report)
    return report


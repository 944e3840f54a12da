"""Cache growth: extraction time and bytes on disk for N rows of a tiny agent."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cache_schema import ArraySpec
from extract.agents import get_agent
from extract.runner import run_agent
from pipelines.bench.agents import register_tiny
from pipelines.bench.extraction import extract_job
from pipelines.bench.fixtures import write_images
from pipelines.bench.harness import Context
from pipelines.bench.plans import TINY, Plan
from pipelines.bench.report import Result


def measure(context: Context) -> tuple[dict, list[Result]]:
    """Item 5: cache growth of a tiny agent, and the size of one real-shape vision row."""
    table = scaling(context.plan, context.scratch / "scaling")
    real_row = payload_per_row(context.caches["dino"]) if context.plan.shapes.real else None
    return {"table": table}, scaling_results(table, real_row)


def scaling(plan: Plan, work: Path) -> list[dict]:
    """Item 5: the tiny dino agent through `run_agent` for N rows (N/4 images x 4 views): time and bytes."""
    register_tiny(TINY)
    views = 4
    image_root = work / "scaling-images"
    keys = write_images(image_root, max(plan.scaling_rows) // views, (48, 40), suffix=".png")
    run_agent(extract_job(get_agent("dino"), TINY, image_root, keys[:2], views, 16, "cpu"), work / "warm-up",
              progress=False)   # one-off imports and first-call costs stay out of the first row of the table
    table = []
    for rows in plan.scaling_rows:
        job = extract_job(get_agent("dino"), TINY, image_root, keys[:rows // views], views, 16, "cpu")
        cache_root = work / f"scaling-cache-{rows}"
        start = time.perf_counter()
        report = run_agent(job, cache_root, progress=False)
        seconds = time.perf_counter() - start
        apparent, allocated, files = _disk_usage(Path(report.cache))
        table.append({"rows": report.rows, "seconds": seconds, "rows_per_second": report.rows / seconds,
                      "bytes": apparent, "bytes_on_disk": allocated, "files": files,
                      "bytes_per_row": apparent / report.rows, "disk_bytes_per_row": allocated / report.rows,
                      "payload_bytes_per_row": payload_per_row(Path(report.cache))})
        shutil.rmtree(cache_root, ignore_errors=True)
    return table


def _disk_usage(path: Path) -> tuple[int, int, int]:
    apparent = allocated = files = 0
    for directory, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(directory, name))
            apparent += stat.st_size
            allocated += stat.st_blocks * 512
            files += 1
    return apparent, allocated, files


def payload_per_row(cache: Path) -> int:
    manifest = json.loads((cache / "manifest.json").read_text())
    return sum(ArraySpec.from_dict(spec).row_bytes for spec in manifest["arrays"].values())


def scaling_results(table: list[dict], real_row_bytes: int | None) -> list[Result]:
    out = [Result(5, f"scaling_{row['rows']}", f"tiny dino: {row['rows']} rows", row["seconds"], "s",
                  details=row) for row in table]
    if real_row_bytes:
        out.append(Result(5, "real_row_bytes", "ViT-B/16 vision row (fp16 tokens + fp32 means + view)",
                          real_row_bytes, "B"))
    return out

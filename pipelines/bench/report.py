"""Verdicts against the targets, the printed table and the JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.bench.plans import VARIANTS


@dataclass
class Result:
    item: int
    key: str
    label: str
    value: float | None
    unit: str
    target: str = ""            # "<= 1.10", ">= 3.5", ... ; empty = informational
    device: str = "-"
    reason: str = ""            # why a target was missed (likely cause), filled only on a miss
    details: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if not self.target or self.value is None:
            return "info"
        op, bound = self.target.split()
        bound = float(bound)
        ok = {"<=": self.value <= bound, ">=": self.value >= bound, "<": self.value < bound}[op]
        return "pass" if ok else "MISS"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        if self.verdict != "MISS":
            data["reason"] = ""
        return data


def format_table(results: list[Result]) -> str:
    lines = [f"{'#':<2} {'measure':<68} {'device':<6} {'value':>10} {'target':>8}  verdict",
             "-" * 106]
    for r in results:
        if r.item == 5:
            continue
        lines.append(f"{r.item:<2} {r.label[:68]:<68} {r.device:<6} {_format_value(r):>10} "
                     f"{'no' if r.unit == 'flag' else r.target:>8}  {r.verdict}")
    scaling_rows = [r for r in results if r.item == 5 and r.key.startswith("scaling_")]
    if scaling_rows:
        lines += ["", "5  scaling, tiny dino agent (N/4 images x 4 views, zarr):",
                  f"   {'rows':>7} {'seconds':>9} {'rows/s':>8} {'MB':>9} {'MB on disk':>11} {'files':>7} "
                  f"{'B/row':>7} {'disk B/row':>10} {'payload B/row':>13}"]
        for r in scaling_rows:
            d = r.details
            lines.append(f"   {d['rows']:>7} {d['seconds']:>9.2f} {d['rows_per_second']:>8.0f} "
                         f"{d['bytes'] / 1e6:>9.2f} {d['bytes_on_disk'] / 1e6:>11.2f} {d['files']:>7} "
                         f"{d['bytes_per_row']:>7.0f} {d['disk_bytes_per_row']:>10.0f} "
                         f"{d['payload_bytes_per_row']:>13}")
    real = [r for r in results if r.key == "real_row_bytes"]
    if real:
        lines.append(f"   a ViT-B/16 vision row (12 x 196 x 768 fp16 + means + view) is {real[0].value / 1e6:.2f} MB")
    for r in results:
        if r.key == "stage2_time_overhead":
            step, peak = r.details["median_step_seconds"], r.details.get("peak_anon_rss_bytes") or \
                r.details.get("peak_gpu_allocated_bytes") or {}
            cells = [f"{v} {step[v]:.2f} s" + (f" / {peak[v] / 1e9:.2f} GB" if peak.get(v) else "")
                     for v in VARIANTS]
            lines.append(f"\n1-2 [{r.device}] median step / peak memory: " + ", ".join(cells))
    misses = [r for r in results if r.verdict == "MISS"]
    if misses:
        lines += ["", "Missed targets (likely reason):"]
        lines += [f"  - [{r.device}] {r.label}: {_format_value(r)} vs {r.target}. {r.reason}" for r in misses]
    return "\n".join(lines)


def _format_value(r: Result) -> str:
    if r.value is None:
        return "-"
    if r.unit == "flag":
        return "yes" if r.value else "no"
    return f"{r.value:.2f}{r.unit}" if r.unit in ("x", "s") else f"{r.value:g}"


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")

"""Verdicts against the targets, the printed table and the JSON."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.bench.harness import Spread
from pipelines.bench.plans import VARIANTS


@dataclass
class Result:
    item: int
    key: str
    label: str
    value: float | None         # the median (of the paired ratios, for a comparison)
    unit: str
    target: str = ""            # "<= 1.10", ">= 3.5", ... ; empty = informational
    device: str = "-"
    reason: str = ""            # the likely cause, kept for a miss or a figure within noise
    details: dict = field(default_factory=dict)
    spread: Spread | None = None  # the range of the repetitions behind `value`

    @property
    def verdict(self) -> str:
        """pass / MISS by the median, "within noise" when the target lies inside the spread, info without one."""
        if not self.target or self.value is None:
            return "info"
        op, bound = self.target.split()
        bound = float(bound)
        if self.spread is not None and self.spread.count > 1 and self.spread.contains(bound):
            return "within noise"
        ok = {"<=": self.value <= bound, ">=": self.value >= bound, "<": self.value < bound}[op]
        return "pass" if ok else "MISS"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["spread"] = self.spread.to_dict() if self.spread is not None else None
        data["verdict"] = self.verdict
        if self.verdict not in ("MISS", "within noise"):
            data["reason"] = ""
        return data


LABEL_WIDTH = 60


def format_table(results: list[Result]) -> str:
    """One screen: median, spread (min-max, repetitions), target and verdict of each figure, then the tables."""
    header = (f"{'#':<2} {'measure':<{LABEL_WIDTH}} {'device':<6} {'median':>9} {'spread (n)':>20} {'target':>8}"
              "  verdict")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.item == 5:
            continue
        lines.append(f"{r.item:<2} {r.label[:LABEL_WIDTH]:<{LABEL_WIDTH}} {r.device:<6} {format_value(r):>9} "
                     f"{format_spread(r):>20} {'no' if r.unit == 'flag' else r.target:>8}  {r.verdict}")
    lines += _scaling_lines(results)
    lines += _stage2_lines(results)
    for verdict, title in (("MISS", "Missed targets (likely reason):"),
                           ("within noise", "Within noise (the target lies inside the spread; what decides it):")):
        chosen = [r for r in results if r.verdict == verdict]
        if chosen:
            lines += ["", title]
            lines += [f"  - [{r.device}] {r.label}: {format_value(r)} ({format_spread(r)}) vs {r.target}. {r.reason}"
                      for r in chosen]
    return "\n".join(lines)


def _stage2_lines(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        d = r.details
        if r.key == "stage2_time_overhead":
            lines.append(f"\n1  [{r.device}] loader epochs of {d['steps_per_epoch']} steps, medians:")
            lines += [f"     {name:<20} step {step:.2f} s, wait {d['median_wait_seconds'][name] * 1e3:.1f} ms "
                      f"(first batch {d['median_first_wait_seconds'][name] * 1e3:.0f} ms)"
                      for name, step in d["median_step_seconds"].items()]
        if r.key == "stage2_memory_overhead":
            step, peak = d["median_step_seconds"], d["median_peak_bytes"]
            cells = [f"{v} " + (f"{step[v]:.2f} s" if v in step else "-") +
                     (f" / {peak[v] / 1e9:.2f} GB" if v in peak else "") for v in VARIANTS if v in step or v in peak]
            lines.append(f"1-2 [{r.device}] median step / peak memory: " + ", ".join(cells))
    return lines


def _scaling_lines(results: list[Result]) -> list[str]:
    lines = []
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
    return lines


def format_value(r: Result) -> str:
    if r.value is None:
        return "-"
    if r.unit == "flag":
        return "yes" if r.value else "no"
    return _number(r.value, r.unit) + r.unit if r.unit in ("x", "s", "%", "ms") else f"{r.value:g}"


def format_spread(r: Result) -> str:
    if r.spread is None or r.value is None:
        return ""
    return f"{_number(r.spread.low, r.unit)}-{_number(r.spread.high, r.unit)}{r.unit} ({r.spread.count})"


def _number(value: float, unit: str) -> str:
    return f"{value:.1f}" if unit in ("%", "ms") and abs(value) >= 10 else f"{value:.2f}"


def json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(output: Path, report: dict) -> None:
    """`report` as JSON at `output`, replaced in one step (a reader never sees half a file)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=json_default) + "\n")
    os.replace(temporary, output)

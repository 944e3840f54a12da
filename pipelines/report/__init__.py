"""Results tables (markdown + CSV) and plots from a runs directory, with the published numbers beside ours.

    report = write_report("runs/")   # runs/results.md, runs/results.csv, runs/plots/*.png

`runs` finds and reads run directories, `aggregation` computes seed statistics, averages and the paper's numbers,
`rendering` writes the CSV and markdown tables, `plots` draws the PNGs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.report.aggregation import Row, load_published, summarise
from pipelines.report.plots import make_plots
from pipelines.report.rendering import render_markdown, write_csv
from pipelines.report.runs import (
    ReportError,
    Run,
    UnfinishedRun,
    find_runs,
    read_metrics,
)


@dataclass
class Report:
    runs: list[Run]
    unfinished: list[UnfinishedRun]
    rows: list[Row]
    markdown_path: Path
    csv_path: Path
    plots: list[Path]
    notes: list[str]
    markdown: str


def write_report(runs_dir, out_dir=None, plots: bool = True, published_path=None) -> Report:
    """Read `runs_dir`, write results.md, results.csv and plots/*.png into `out_dir` (default: `runs_dir`)."""
    runs_dir = Path(runs_dir)
    notes: list[str] = []
    runs, unfinished = find_runs(runs_dir, notes)
    published = load_published(published_path)
    rows = summarise(runs, published)
    out_dir = Path(out_dir) if out_dir is not None else runs_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_paths = make_plots(runs, rows, published, out_dir / "plots", notes) if plots else []
    csv_path, markdown_path = out_dir / "results.csv", out_dir / "results.md"
    write_csv(rows, csv_path)
    markdown = render_markdown(runs_dir, runs, unfinished, rows, published, plot_paths, out_dir, notes)
    markdown_path.write_text(markdown)
    return Report(runs, unfinished, rows, markdown_path, csv_path, plot_paths, notes, markdown)


__all__ = ["Report", "ReportError", "Row", "Run", "UnfinishedRun", "find_runs", "load_published", "make_plots",
           "read_metrics", "render_markdown", "summarise", "write_csv", "write_report"]

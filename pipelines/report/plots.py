"""The report's plots (PNG): few-shot curves, base/novel/HM bars per ablation, loss terms and gate weights over
training. matplotlib is imported only when a plot is drawn (`transagent report --no-plots` never imports it)."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from pipelines.report.aggregation import AVERAGE, PAPER_METHOD, Row, mean_of, ordered
from pipelines.report.runs import Run, read_metrics

LOSS_TERMS = ("ce", "vac", "lac", "rel", "mac", "total")


def make_plots(runs: list[Run], rows: list[Row], published: dict, plot_dir: Path, notes: list[str]) -> list[Path]:
    """PNG plots: few-shot curves, base/novel/HM bars per ablation, loss terms and gate weights over training."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    plots += _plot_fewshot(rows, published, plot_dir)
    plots += _plot_base2novel(rows, plot_dir)
    plots += _plot_training(runs, plot_dir, notes)
    return plots


def _figure(width=6.4, height=4.2, columns=1):
    from matplotlib.figure import (
        Figure,  # object API: no pyplot, no global backend state
    )

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _plot_fewshot(rows, published, plot_dir) -> list[Path]:
    paper = published.get("fewshot", {}).get("methods", {})
    plots = []
    for dataset in ordered({r.dataset for r in rows if r.section == "fewshot"}, published):
        ours = [r for r in rows if r.section == "fewshot" and r.dataset == dataset]
        figure, (axis,) = _figure()
        for ablation in sorted({r.ablation for r in ours}, key=lambda a: (a != "default", a)):
            points = sorted((r for r in ours if r.ablation == ablation), key=lambda r: r.shots)
            axis.errorbar([r.shots for r in points], [r.mean for r in points],
                          yerr=[r.std or 0.0 for r in points], marker="o", capsize=3, label=ablation)
        key = "average" if dataset == AVERAGE else dataset
        record = paper.get(PAPER_METHOD, {}).get(key, {})
        shots = sorted((int(k) for k in record if k.isdigit()), key=int)
        if shots:
            axis.plot(shots, [record[str(k)] for k in shots], "k--s", label=f"{PAPER_METHOD} (paper)")
        zero_shot = paper.get("Zero-shot CLIP", {}).get(key, {}).get("0")
        if zero_shot is not None:
            axis.axhline(zero_shot, color="grey", linestyle=":", label="zero-shot CLIP (paper)")
        all_shots = sorted({r.shots for r in ours} | set(shots))
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_shots, [str(k) for k in all_shots])
        axis.set(xlabel="shots per class (K)", ylabel="top-1 accuracy (%)", title=f"Few-shot: {dataset}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
        plots.append(_save(figure, plot_dir / f"fewshot-{_safe(dataset)}.png"))
    return plots


def _plot_base2novel(rows, plot_dir) -> list[Path]:
    plots = []
    for shots in sorted({r.shots for r in rows if r.section == "base2novel"}):
        chosen = [r for r in rows if r.section == "base2novel" and r.shots == shots]
        for dataset in dict.fromkeys(r.dataset for r in chosen):
            ablations = list(dict.fromkeys(r.ablation for r in chosen if r.dataset == dataset))
            figure, (axis,) = _figure(width=max(4.0, 1.6 * len(ablations) + 2))
            x = np.arange(len(ablations))
            for i, metric in enumerate(("base", "novel", "hm")):
                values = [next(r for r in chosen if r.dataset == dataset and r.ablation == a and r.metric == metric)
                          for a in ablations]
                axis.bar(x + (i - 1) * 0.27, [r.mean for r in values], 0.27, yerr=[r.std or 0.0 for r in values],
                         capsize=3, label=metric.upper() if metric == "hm" else metric)
            axis.set_xticks(x, ablations, rotation=20, ha="right", fontsize="small")
            axis.set(ylabel="top-1 accuracy (%)", title=f"Base-to-novel: {dataset} ({shots} shots)")
            axis.legend(fontsize="small")
            axis.grid(axis="y", alpha=0.3)
            plots.append(_save(figure, plot_dir / f"base2novel-{_safe(dataset)}-shots{shots}.png"))
    return plots


def _plot_training(runs, plot_dir, notes) -> list[Path]:
    """Per (dataset, protocol, shots, ablation): loss terms and mean gate weight per agent, averaged over seeds."""
    groups = defaultdict(list)
    for run in runs:
        groups[(run.dataset, run.protocol, run.shots, run.ablation)].append(run)
    plots = []
    for (dataset, protocol, shots, ablation), members in sorted(groups.items()):
        curves = [read_metrics(run.directory / "metrics.jsonl", notes) for run in sorted(members,
                                                                                       key=lambda r: r.seed)]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = min(len(c) for c in curves)
        keys = [k for k in curves[0][0] if all(k in record for c in curves for record in c[:steps])]
        losses = [k for k in LOSS_TERMS if k in keys]
        gates = sorted(k for k in keys if k.startswith("gate/"))
        figure, axes = _figure(columns=2 if gates else 1)
        x = range(1, steps + 1)
        for key in losses:
            axes[0].plot(x, _mean_curve(curves, steps, key), label=key, linewidth=1.8 if key == "total" else 1.0)
        if all(v > 0 for key in losses for v in _mean_curve(curves, steps, key)):
            axes[0].set_yscale("log")
        axes[0].set(xlabel="training step", ylabel="loss (terms unweighted; total weighted)")
        axes[0].set_title(f"Losses: {dataset} {protocol} {shots}-shot, mean of {len(curves)} seed(s)\n{ablation}",
                          fontsize="medium")
        axes[0].legend(fontsize="small")
        axes[0].grid(alpha=0.3)
        if gates:
            for key in gates:
                axes[1].plot(x, _mean_curve(curves, steps, key), label=key.removeprefix("gate/"))
            axes[1].set(xlabel="training step", ylabel="mean gate weight", ylim=(0, 1), title="Gate weights")
            axes[1].legend(fontsize="small")
            axes[1].grid(alpha=0.3)
        plots.append(_save(figure, plot_dir / f"train-{_safe(dataset)}-{protocol}-shots{shots}-{_safe(ablation)}.png"))
    return plots


def _mean_curve(curves: list[list[dict]], steps: int, key: str) -> list[float]:
    """`key` at each of the first `steps` records, averaged over the seeds' curves."""
    return [mean_of(curve[i][key] for curve in curves) for i in range(steps)]


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path

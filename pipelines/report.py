"""Results tables (markdown + CSV) and plots from a runs directory, with the published numbers beside ours.

Reads what stage 2 writes under `runs/<dataset>/<protocol>/shots<K>/seed<S>/<ablation>/`: final.json (the
accuracies of the last epoch), metrics.jsonl (loss terms and gate weights per step) and eval-<dataset>.json (the
same prompts evaluated on another dataset, for cross-dataset and domain generalisation). A run directory without
final.json is unfinished: it is listed, never counted.

Conventions, as in the paper (reference §8.1) and CoOp's tools: accuracy is top-1 in %, mean over seeds ± the
population standard deviation (np.std, as Dassl's parse_test_res.py); a dataset's HM is the harmonic mean of the
seed-mean base and novel accuracies (its ± is the spread of the per-seed HMs); an "Average" row averages the
datasets' means and its HM is the HM of the averaged base and novel.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.protocols import PROTOCOLS
from pipelines.runs import configured_epochs

PUBLISHED_PATH = Path(__file__).with_name("published.json")
PAPER_METHOD = "TransAgent"
SECTIONS = ("base2novel", "fewshot", "cross", "dg")
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
RUN_FILES = ("final.json", "config.json", "metrics.jsonl", "checkpoint.safetensors", "checkpoint.pt")
LOSS_TERMS = ("ce", "vac", "lac", "rel", "mac", "total")
AVERAGE = "Average"


class ReportError(ValueError):
    """The runs directory (or a file in it) cannot be reported on; the message says which and why."""


@dataclass(frozen=True)
class Run:
    directory: Path
    dataset: str
    protocol: str
    shots: int
    seed: int
    ablation: str
    accuracy: dict                      # final.json "accuracy": base/novel/hm or all
    evaluations: dict = field(default_factory=dict)   # other dataset -> accuracy (eval-<dataset>.json)


@dataclass(frozen=True)
class UnfinishedRun:
    directory: Path
    dataset: str
    protocol: str
    shots: int | None
    seed: int | None
    ablation: str
    epochs_done: int
    epochs: int | None


@dataclass
class Row:
    """One reported number: a metric of (section, dataset, target, shots, ablation) over seeds or datasets."""
    section: str           # base2novel | fewshot | cross | dg
    dataset: str           # the training dataset, or "Average"
    target: str            # the evaluated dataset (the training one except in cross/dg), or "Average"
    shots: int
    ablation: str
    metric: str            # base | novel | hm | all
    mean: float
    std: float | None      # over seeds; None for one seed and for Average rows
    seeds: tuple = ()
    members: tuple = ()    # the datasets an Average row averages
    paper: float | None = None
    paper_source: str = ""


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


# ---------------------------------------------------------------------------------------------------- reading
def find_runs(runs_dir, notes: list[str] | None = None) -> tuple[list[Run], list[UnfinishedRun]]:
    """Every run directory under `runs_dir` (it may itself be one): finished runs and unfinished ones."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise ReportError(f"runs directory {runs_dir} does not exist")
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir} is not a directory; pass the runs root (e.g. runs/)")
    notes = notes if notes is not None else []
    finished, unfinished = [], []
    for directory, subdirs, files in os.walk(runs_dir):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        if not any(name in files for name in RUN_FILES):
            continue
        subdirs[:] = []   # a run directory holds no runs
        directory = Path(directory)
        if "final.json" in files:
            finished.append(_read_finished(directory))
        else:
            unfinished.append(_read_unfinished(directory, notes))
    if not finished and not unfinished:
        raise ReportError(f"no run directories under {runs_dir}: expected <dataset>/<protocol>/shots<K>/seed<S>/"
                          "<ablation>/ folders holding final.json (written by `transagent distill`)")
    return finished, unfinished


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return value


def _read_finished(directory: Path) -> Run:
    path = directory / "final.json"
    final = _read_json(path)
    missing = [key for key in ("dataset", "protocol", "shots", "seed", "ablation", "accuracy") if key not in final]
    if missing:
        raise ReportError(f"{path}: missing {', '.join(missing)}")
    if final["protocol"] not in PROTOCOLS:
        raise ReportError(f"{path}: unknown protocol {final['protocol']!r}")
    needed = ("base", "novel") if final["protocol"] == "base2novel" else ("all",)
    _check_accuracy(path, final["accuracy"], needed)
    evaluations = {}
    for eval_path in sorted(directory.glob("eval-*.json")):
        result = _read_json(eval_path)
        if "dataset" not in result or "accuracy" not in result:
            raise ReportError(f"{eval_path}: expected 'dataset' and 'accuracy' (written by `transagent evaluate`)")
        if result["dataset"] == final["dataset"]:
            continue   # a re-evaluation on the run's own test sets: final.json is the record
        _check_accuracy(eval_path, result["accuracy"], ("all",))
        evaluations[result["dataset"]] = result["accuracy"]
    return Run(directory, final["dataset"], final["protocol"], int(final["shots"]), int(final["seed"]),
               str(final["ablation"]), final["accuracy"], evaluations)


def _check_accuracy(path: Path, accuracy, needed: tuple[str, ...]) -> None:
    if not isinstance(accuracy, dict) or any(not isinstance(accuracy.get(k), (int, float)) for k in needed):
        raise ReportError(f"{path}: 'accuracy' must hold numbers for {', '.join(needed)}, got {accuracy!r}")


_RUN_PATH = re.compile(r"(?P<dataset>[^/]+)/(?P<protocol>[^/]+)/shots(?P<shots>\d+)/seed(?P<seed>\d+)/[^/]+$")


def _read_unfinished(directory: Path, notes: list[str]) -> UnfinishedRun:
    run = {}
    if (directory / "config.json").exists():
        run = _read_json(directory / "config.json").get("run", {})
    match = _RUN_PATH.search(directory.as_posix())
    from_path = match.groupdict() if match else {}
    shots, seed = run.get("shots", from_path.get("shots")), run.get("seed", from_path.get("seed"))
    records = read_metrics(directory / "metrics.jsonl", notes)
    return UnfinishedRun(directory, run.get("dataset", from_path.get("dataset", "?")),
                         run.get("protocol", from_path.get("protocol", "?")),
                         int(shots) if shots is not None else None, int(seed) if seed is not None else None,
                         directory.name, max((int(r.get("epoch", 0)) for r in records), default=0),
                         configured_epochs(run))


def read_metrics(path: Path, notes: list[str] | None = None) -> list[dict]:
    """metrics.jsonl in training order, one record per (epoch, step); unreadable lines are skipped and noted."""
    if not path.exists():
        return []
    records, bad = {}, 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[(int(record["epoch"]), int(record["step"]))] = record   # a resumed epoch replaces the old
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    if bad and notes is not None:
        notes.append(f"{path}: skipped {bad} unreadable line(s)")
    return [records[key] for key in sorted(records)]


def load_published(path=None) -> dict:
    """pipelines/published.json (or another file of the same shape)."""
    path = Path(path) if path else PUBLISHED_PATH
    published = _read_json(path)
    for section in ("base2novel", "fewshot"):
        for method, records in published.get(section, {}).get("methods", {}).items():
            for dataset, record in records.items():
                if not record.get("source"):
                    raise ReportError(f"{path}: {section}/{method}/{dataset} has no source")
    return published


# ------------------------------------------------------------------------------------------------ aggregation
def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _std(values) -> float | None:
    """Population standard deviation (np.std), None for a single value."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarise(runs: list[Run], published: dict) -> list[Row]:
    """Seed statistics per (section, dataset, target, shots, ablation), Average rows, and the paper's numbers."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    where: dict[tuple, Path] = {}

    def add(key: tuple, run: Run, accuracy: dict) -> None:
        if run.seed in groups[key]:
            raise ReportError(f"two finished runs for {'/'.join(map(str, key))} seed {run.seed}: "
                              f"{where[key + (run.seed,)]} and {run.directory}")
        groups[key][run.seed] = accuracy
        where[key + (run.seed,)] = run.directory

    for run in runs:
        if run.protocol in ("base2novel", "fewshot"):
            add((run.protocol, run.dataset, run.dataset, run.shots, run.ablation), run, run.accuracy)
        transfer_sections = {_transfer_section(target) for target in run.evaluations}
        if run.protocol in ("cross", "dg"):
            transfer_sections.add(run.protocol)
        for section in transfer_sections:   # the source dataset's own accuracy heads its cross/dg table
            add((section, run.dataset, run.dataset, run.shots, run.ablation), run, run.accuracy)
        for target, accuracy in run.evaluations.items():
            add((_transfer_section(target), run.dataset, target, run.shots, run.ablation), run, accuracy)

    rows = []
    for (section, dataset, target, shots, ablation), by_seed in groups.items():
        rows += _seed_rows(section, dataset, target, shots, ablation, by_seed)
    rows += _average_rows(rows)
    for row in rows:
        row.paper, row.paper_source = _paper_value(published, row)
    return sorted(rows, key=lambda row: _row_order(row, published))


def _transfer_section(target: str) -> str:
    return "dg" if target in DG_TARGETS else "cross"


def _seed_rows(section, dataset, target, shots, ablation, by_seed: dict[int, dict]) -> list[Row]:
    seeds = tuple(sorted(by_seed))
    accuracies = [by_seed[seed] for seed in seeds]

    def row(metric, mean, std):
        return Row(section, dataset, target, shots, ablation, metric, mean, std, seeds)

    if section != "base2novel":
        values = [a["all"] for a in accuracies]
        return [row("all", _mean(values), _std(values))]
    base, novel = [a["base"] for a in accuracies], [a["novel"] for a in accuracies]
    per_seed_hm = [harmonic_mean(b, n) for b, n in zip(base, novel)]
    return [row("base", _mean(base), _std(base)), row("novel", _mean(novel), _std(novel)),
            row("hm", harmonic_mean(_mean(base), _mean(novel)), _std(per_seed_hm))]


def _average_rows(rows: list[Row]) -> list[Row]:
    """Mean over datasets (cross/dg: over targets other than the source), when there are at least two."""
    groups: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row.metric == "hm":
            continue
        if row.section in ("base2novel", "fewshot"):
            groups[(row.section, AVERAGE, row.shots, row.ablation)][row.dataset][row.metric] = row.mean
        elif row.target != row.dataset:
            groups[(row.section, row.dataset, row.shots, row.ablation)][row.target][row.metric] = row.mean
    averages = []
    for (section, dataset, shots, ablation), members in groups.items():
        if len(members) < 2:
            continue
        names = tuple(sorted(members))

        def row(metric, mean):
            return Row(section, dataset, AVERAGE, shots, ablation, metric, mean, None, (), names)

        if section == "base2novel":
            base = _mean(m["base"] for m in members.values())
            novel = _mean(m["novel"] for m in members.values())
            averages += [row("base", base), row("novel", novel), row("hm", harmonic_mean(base, novel))]
        else:
            averages.append(row("all", _mean(m["all"] for m in members.values())))
    return averages


def _paper_value(published: dict, row: Row) -> tuple[float | None, str]:
    """The paper's TransAgent number for this row and its source; for an Average row, the published average
    when we average the same datasets, otherwise the mean of the published per-dataset numbers if all exist."""
    section = published.get(row.section, {})
    records = section.get("methods", {}).get(PAPER_METHOD, {})
    if row.section == "base2novel":
        if section.get("shots") not in (None, row.shots):
            return None, ""
        key = row.metric
    elif row.section == "fewshot":
        key = str(row.shots)
    else:
        key = row.metric
    if row.dataset != AVERAGE and row.target != AVERAGE:
        record = records.get(row.target, {})
        return (record[key], record["source"]) if key in record else (None, "")
    members = list(row.members)
    if set(members) == set(published.get("average_over", ())) and key in records.get("average", {}):
        return records["average"][key], records["average"]["source"]
    if row.section == "base2novel" and key == "hm":
        base, source_b = _mean_of_published(records, members, "base")
        novel, source_n = _mean_of_published(records, members, "novel")
        if base is None or novel is None:
            return None, ""
        return harmonic_mean(base, novel), "HM of " + "; ".join(sorted({source_b, source_n}))
    return _mean_of_published(records, members, key)


def _mean_of_published(records: dict, datasets: list[str], key: str) -> tuple[float | None, str]:
    if not datasets or any(key not in records.get(d, {}) for d in datasets):
        return None, ""
    sources = sorted({records[d]["source"] for d in datasets})
    return _mean(records[d][key] for d in datasets), f"mean over {len(datasets)} datasets of: " + "; ".join(sources)


def _dataset_order(name: str, published: dict) -> tuple:
    order = list(published.get("average_over", ()))
    if name == AVERAGE:
        return (2, 0, "")
    return (0, order.index(name), "") if name in order else (1, 0, name)


def _row_order(row: Row, published: dict) -> tuple:
    return (SECTIONS.index(row.section), row.shots if row.section != "fewshot" else 0,
            _dataset_order(row.dataset, published), row.target != row.dataset,
            _dataset_order(row.target, published), row.ablation != "default", row.ablation, row.shots,
            ("base", "novel", "hm", "all").index(row.metric))


# ---------------------------------------------------------------------------------------------------- writing
CSV_COLUMNS = ("section", "dataset", "target", "shots", "ablation", "metric", "mean", "std", "n_seeds", "seeds",
               "datasets", "paper", "paper_source")


def write_csv(rows: list[Row], path: Path) -> None:
    """One row per reported number (tidy), so pandas/spreadsheets can pivot it any way."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow([row.section, row.dataset, row.target, row.shots, row.ablation, row.metric,
                             _round(row.mean), _round(row.std), len(row.seeds) or "",
                             ";".join(map(str, row.seeds)), ";".join(row.members), _round(row.paper),
                             row.paper_source])


def _round(value):
    return "" if value is None else round(value, 4)


def _cell(row: Row | None) -> str:
    if row is None:
        return "–"
    return f"{row.mean:.2f}" + (f" ± {row.std:.2f}" if row.std is not None else "")


def _number(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(line) + " |" for line in lines] + [""])


def _dataset_label(row: Row, name: str) -> str:
    return f"**{AVERAGE}** ({len(row.members)} datasets)" if name == AVERAGE else name


def render_markdown(runs_dir: Path, runs: list[Run], unfinished: list[UnfinishedRun], rows: list[Row],
                    published: dict, plots: list[Path], out_dir: Path, notes: list[str]) -> str:
    lines = ["# Results", "",
             f"Runs: `{runs_dir}` — {len(runs)} finished, {len(unfinished)} unfinished (not counted).", "",
             "Top-1 accuracy (%) of the last epoch, mean ± std over seeds (population std, as Dassl's "
             "parse_test_res.py). HM = harmonic mean of the seed-mean base and novel (± = spread of the per-seed "
             "HMs). Average rows average the datasets' means; their HM is the HM of the averaged base and novel. "
             f"\"Paper\" = the published {PAPER_METHOD} numbers (`pipelines/published.json`) with their source; "
             "an Average's paper value is the published average only when the same datasets are averaged.", ""]
    by_key = {(r.section, r.dataset, r.target, r.shots, r.ablation, r.metric): r for r in rows}
    lines += _base2novel_markdown(rows, by_key, published)
    lines += _fewshot_markdown(rows, published)
    for section, title in (("cross", "Cross-dataset"), ("dg", "Domain generalisation")):
        lines += _transfer_markdown(rows, published, section, title)
    if unfinished:
        lines += ["## Unfinished runs", ""]
        lines += _table(["Dataset", "Protocol", "Shots", "Seed", "Ablation", "Progress", "Directory"],
                        [[u.dataset, u.protocol, str(u.shots), str(u.seed), u.ablation,
                          f"{u.epochs_done}/{u.epochs if u.epochs is not None else '?'} epochs",
                          f"`{u.directory}`"] for u in unfinished])
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{plot.stem}]({Path(os.path.relpath(plot, out_dir)).as_posix()})" for plot in plots] + [""]
    return "\n".join(lines)


def _base2novel_markdown(rows, by_key, published) -> list[str]:
    if not any(r.section == "base2novel" for r in rows):
        return []
    lines = []
    for shots in sorted({r.shots for r in rows if r.section == "base2novel"}):
        heads = [r for r in rows if r.section == "base2novel" and r.shots == shots and r.metric == "base"]
        table = []
        for head in heads:
            b, n, h = (by_key[("base2novel", head.dataset, head.target, shots, head.ablation, m)]
                       for m in ("base", "novel", "hm"))
            sources = sorted({r.paper_source for r in (b, n, h) if r.paper_source})
            table.append([_dataset_label(head, head.dataset), head.ablation, ",".join(map(str, head.seeds)),
                          _cell(b), _cell(n), _cell(h),
                          " / ".join(_number(r.paper) for r in (b, n, h)), "; ".join(sources)])
        lines += [f"## Base-to-novel ({shots} shots)", ""]
        lines += _table(["Dataset", "Ablation", "Seeds", "Base", "Novel", "HM", "Paper (B / N / HM)",
                         "Paper source"], table)
    datasets = [d for d in _ordered({r.dataset for r in rows if r.section == "base2novel"}, published)]
    shots = published.get("base2novel", {}).get("shots")
    lines += _baselines_markdown(published, "base2novel", datasets, ("base", "novel", "hm"),
                                 "Published base-to-novel results" + (f" ({shots} shots)" if shots else ""))
    return lines


def _fewshot_markdown(rows, published) -> list[str]:
    table = [[_dataset_label(r, r.dataset), str(r.shots), r.ablation, ",".join(map(str, r.seeds)), _cell(r),
              _number(r.paper), r.paper_source]
             for r in rows if r.section == "fewshot"]
    if not table:
        return []
    lines = ["## Few-shot", ""]
    lines += _table(["Dataset", "K", "Ablation", "Seeds", "Accuracy", "Paper", "Paper source"], table)
    datasets = _ordered({r.dataset for r in rows if r.section == "fewshot"}, published)
    shots = sorted({key for method in published.get("fewshot", {}).get("methods", {}).values()
                    for record in method.values() for key in record if key.isdigit()}, key=int)
    lines += _baselines_markdown(published, "fewshot", datasets, tuple(shots),
                                 "Published few-shot results (columns: K; 0 = zero-shot)")
    return lines


def _transfer_markdown(rows, published, section, title) -> list[str]:
    table = [[r.dataset, _dataset_label(r, r.target), r.ablation, str(r.shots), ",".join(map(str, r.seeds)),
              _cell(r), _number(r.paper), r.paper_source] for r in rows if r.section == section]
    if not table:
        return []
    lines = [f"## {title}", ""]
    note = published.get(section, {}).get("_note")
    if note:
        lines += [f"Paper: {note}", ""]
    return lines + _table(["Source", "Target", "Ablation", "Shots", "Seeds", "Accuracy", "Paper", "Paper source"],
                          table)


def _ordered(names, published) -> list[str]:
    return sorted(names, key=lambda name: _dataset_order(name, published))


def _baselines_markdown(published, section, datasets, keys, title) -> list[str]:
    """Every published method's numbers for the datasets we ran (and the average)."""
    methods = published.get(section, {}).get("methods", {})
    table = [[dataset, method, *(_number(records[dataset].get(key)) for key in keys), records[dataset]["source"]]
             for dataset in [d for d in datasets if d != AVERAGE] + ["average"]
             for method, records in methods.items() if dataset in records]
    if not table:
        return []
    return [f"### {title}", ""] + _table(["Dataset", "Method", *keys, "Source"], table)


# ------------------------------------------------------------------------------------------------------ plots
def make_plots(runs: list[Run], rows: list[Row], published: dict, plot_dir: Path, notes: list[str]) -> list[Path]:
    """PNG plots: few-shot curves, base/novel/HM bars per ablation, loss terms and gate weights over training."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    plots += _plot_fewshot(rows, published, plot_dir)
    plots += _plot_base2novel(rows, plot_dir)
    plots += _plot_training(runs, plot_dir, notes)
    return plots


def _figure(width=6.4, height=4.2, columns=1):
    from matplotlib.figure import Figure   # object API: no pyplot, no global backend state

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def _plot_fewshot(rows, published, plot_dir) -> list[Path]:
    paper = published.get("fewshot", {}).get("methods", {})
    plots = []
    for dataset in _ordered({r.dataset for r in rows if r.section == "fewshot"}, published):
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
    import numpy as np

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

        def mean_curve(key):
            return [_mean(c[i][key] for c in curves) for i in range(steps)]

        for key in losses:
            axes[0].plot(x, mean_curve(key), label=key, linewidth=1.8 if key == "total" else 1.0)
        if all(v > 0 for key in losses for v in mean_curve(key)):
            axes[0].set_yscale("log")
        axes[0].set(xlabel="training step", ylabel="loss (terms unweighted; total weighted)")
        axes[0].set_title(f"Losses: {dataset} {protocol} {shots}-shot, mean of {len(curves)} seed(s)\n{ablation}",
                          fontsize="medium")
        axes[0].legend(fontsize="small")
        axes[0].grid(alpha=0.3)
        if gates:
            for key in gates:
                axes[1].plot(x, mean_curve(key), label=key.removeprefix("gate/"))
            axes[1].set(xlabel="training step", ylabel="mean gate weight", ylim=(0, 1), title="Gate weights")
            axes[1].legend(fontsize="small")
            axes[1].grid(alpha=0.3)
        plots.append(_save(figure, plot_dir / f"train-{_safe(dataset)}-{protocol}-shots{shots}-{_safe(ablation)}.png"))
    return plots


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------------- entry point
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

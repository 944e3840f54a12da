"""Seed statistics, Average rows and the published numbers beside them.

Conventions, as in the paper (reference §8.1) and CoOp's tools: accuracy is top-1 in %, mean over seeds ± the
population standard deviation (np.std, as Dassl's parse_test_res.py); a dataset's HM is the harmonic mean of the
seed-mean base and novel accuracies (its ± is the spread of the per-seed HMs); an "Average" row averages the
datasets' means and its HM is the HM of the averaged base and novel.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pipelines.protocols import PROTOCOLS
from pipelines.report.runs import ReportError, Run, read_json

PUBLISHED_PATH = Path(__file__).parent.parent / "published.json"
PAPER_METHOD = "TransAgent"
SECTIONS = PROTOCOLS
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
AVERAGE = "Average"


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


def load_published(path=None) -> dict:
    """pipelines/published.json (or another file of the same shape)."""
    path = Path(path) if path else PUBLISHED_PATH
    published = read_json(path)
    for section in ("base2novel", "fewshot"):
        for method, records in published.get(section, {}).get("methods", {}).items():
            for dataset, record in records.items():
                if not record.get("source"):
                    raise ReportError(f"{path}: {section}/{method}/{dataset} has no source")
    return published


def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def mean_of(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _std(values) -> float | None:
    """Population standard deviation (np.std), None for a single value."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = mean_of(values)
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
        return [row("all", mean_of(values), _std(values))]
    base, novel = [a["base"] for a in accuracies], [a["novel"] for a in accuracies]
    per_seed_hm = [harmonic_mean(b, n) for b, n in zip(base, novel, strict=True)]
    return [row("base", mean_of(base), _std(base)), row("novel", mean_of(novel), _std(novel)),
            row("hm", harmonic_mean(mean_of(base), mean_of(novel)), _std(per_seed_hm))]


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
        group = {"section": section, "dataset": dataset, "target": AVERAGE, "shots": shots, "ablation": ablation,
                 "std": None, "members": tuple(sorted(members))}
        if section == "base2novel":
            base = mean_of(m["base"] for m in members.values())
            novel = mean_of(m["novel"] for m in members.values())
            means = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        else:
            means = {"all": mean_of(m["all"] for m in members.values())}
        averages += [Row(**group, metric=metric, mean=value) for metric, value in means.items()]
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
    return mean_of(records[d][key] for d in datasets), f"mean over {len(datasets)} datasets of: " + "; ".join(sources)


def ordered(names, published) -> list[str]:
    return sorted(names, key=lambda name: _dataset_order(name, published))


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

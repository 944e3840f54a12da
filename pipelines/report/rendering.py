"""The report's tables: results.csv (one row per number) and results.md (a table per protocol, the published
methods' numbers below ours)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from pipelines.report.aggregation import AVERAGE, PAPER_METHOD, Row, ordered
from pipelines.report.runs import Run, UnfinishedRun

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
    datasets = [d for d in ordered({r.dataset for r in rows if r.section == "base2novel"}, published)]
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
    datasets = ordered({r.dataset for r in rows if r.section == "fewshot"}, published)
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


def _baselines_markdown(published, section, datasets, keys, title) -> list[str]:
    """Every published method's numbers for the datasets we ran (and the average)."""
    methods = published.get(section, {}).get("methods", {})
    table = [[dataset, method, *(_number(records[dataset].get(key)) for key in keys), records[dataset]["source"]]
             for dataset in [d for d in datasets if d != AVERAGE] + ["average"]
             for method, records in methods.items() if dataset in records]
    if not table:
        return []
    return [f"### {title}", ""] + _table(["Dataset", "Method", *keys, "Source"], table)

"""Finding and reading the run directories stage 2 writes: `<dataset>/<protocol>/shots<K>/seed<S>/<ablation>/`.

final.json holds the accuracies of the last epoch, metrics.jsonl the loss terms and gate weights per step, and
eval-<dataset>.json the same prompts evaluated on another dataset (cross-dataset and domain generalisation). A run
directory without final.json is unfinished: it is listed, never counted. A file that cannot be read stops the report
with a `ReportError` naming it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.protocols import PROTOCOLS
from pipelines.runs import configured_epochs

RUN_FILES = ("final.json", "config.json", "metrics.jsonl", "checkpoint.safetensors", "checkpoint.pt")


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


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return value


def _read_finished(directory: Path) -> Run:
    path = directory / "final.json"
    final = read_json(path)
    missing = [key for key in ("dataset", "protocol", "shots", "seed", "ablation", "accuracy") if key not in final]
    if missing:
        raise ReportError(f"{path}: missing {', '.join(missing)}")
    if final["protocol"] not in PROTOCOLS:
        raise ReportError(f"{path}: unknown protocol {final['protocol']!r}")
    needed = ("base", "novel") if final["protocol"] == "base2novel" else ("all",)
    _check_accuracy(path, final["accuracy"], needed)
    evaluations = {}
    for eval_path in sorted(directory.glob("eval-*.json")):
        result = read_json(eval_path)
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
        run = read_json(directory / "config.json").get("run", {})
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

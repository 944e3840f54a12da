"""`transagent runs ls`: every run directory under a runs root, with its status, accuracies and job ids.

A run directory is `<dataset>/<protocol>/shots<K>/seed<S>/<ablation>/` holding any of final.json, config.json,
metrics.jsonl, checkpoint.pt or job.json (written when a sweep submitted it through submitit). Every file is read
as untrusted: a file that cannot be read makes the run `unreadable`, with the reason, and never stops the listing.

Status: done (final.json), failed (its job record says so), partial (trained some epochs, no final.json),
submitted (a job record, nothing trained yet), empty.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

RUN_FILES = ("final.json", "config.json", "metrics.jsonl", "checkpoint.pt", "job.json")
_RUN_PATH = re.compile(r"(?P<dataset>[^/]+)/(?P<protocol>[^/]+)/shots(?P<shots>\d+)/seed(?P<seed>\d+)/"
                       r"(?P<ablation>[^/]+)$")
COLUMNS = ("dataset", "protocol", "shots", "seed", "ablation", "status", "epoch", "accuracy", "job_id")


class RunsError(ValueError):
    """The runs root does not exist or is not a directory."""


def _read_object(path: Path):
    """A JSON object, or a string saying why not."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path.name}: {type(error).__name__}: {error}"
    return value if isinstance(value, dict) else f"{path.name}: expected a JSON object"


def _epochs_trained(path: Path) -> int:
    epochs = 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    for line in lines:
        try:
            epochs = max(epochs, int(json.loads(line)["epoch"]))
        except (ValueError, KeyError, TypeError):
            continue
    return epochs


def configured_epochs(run: dict) -> int | None:
    """The epochs of config.json's run (`optim.epochs`; runs made before the optimiser section: `epochs`)."""
    optim = run.get("optim")
    epochs = optim.get("epochs") if isinstance(optim, dict) else run.get("epochs")
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def read_run(directory: Path, runs_root: Path) -> dict:
    relative = directory.relative_to(runs_root).as_posix() if directory != runs_root else directory.name
    match = _RUN_PATH.search(directory.as_posix())
    fields = match.groupdict() if match else {}
    row = {"dataset": fields.get("dataset"), "protocol": fields.get("protocol"),
           "shots": int(fields["shots"]) if fields.get("shots") else None,
           "seed": int(fields["seed"]) if fields.get("seed") else None, "ablation": fields.get("ablation"),
           "status": "empty", "epoch": None, "epochs": None, "accuracy": None, "job_id": None, "job_ids": [],
           "run_dir": relative, "problem": None}
    problems = []
    config = _read_object(directory / "config.json") if (directory / "config.json").exists() else {}
    if isinstance(config, str):
        problems.append(config)
    elif isinstance(config.get("run"), dict):
        row["epochs"] = configured_epochs(config["run"])
    job = _read_object(directory / "job.json") if (directory / "job.json").exists() else None
    if isinstance(job, str):
        problems.append(job)
    elif job is not None:
        ids = job.get("job_ids")
        row["job_ids"] = [str(i) for i in ids] if isinstance(ids, list) else []
        row["job_id"] = str(job["job_id"]) if isinstance(job.get("job_id"), (str, int)) else None
    trained = _epochs_trained(directory / "metrics.jsonl") if (directory / "metrics.jsonl").exists() else 0
    if (directory / "final.json").exists():
        final = _read_object(directory / "final.json")
        if isinstance(final, str):
            problems.append(final)
        else:
            accuracy = final.get("accuracy")
            if isinstance(accuracy, dict) and all(isinstance(v, (int, float)) for v in accuracy.values()):
                row["accuracy"] = accuracy
            else:
                problems.append("final.json: 'accuracy' is not a {split: number} object")
            for name in ("dataset", "protocol", "ablation"):
                if isinstance(final.get(name), str):
                    row[name] = final[name]
            for name in ("shots", "seed", "epochs"):
                if isinstance(final.get(name), int):
                    row[name] = final[name]
            row["status"] = "done"
            trained = row["epochs"] if row["epochs"] is not None else trained
    if row["status"] != "done":
        if isinstance(job, dict) and job.get("status") in ("failed", "not run"):
            row["status"] = "failed"
        elif trained or (directory / "checkpoint.pt").exists():
            row["status"] = "partial"
        elif job is not None:
            row["status"] = "submitted"
    row["epoch"] = trained
    if problems:
        row["status"], row["problem"] = "unreadable", "; ".join(problems)
    return row


def list_runs(runs_root) -> list[dict]:
    """Every run directory under `runs_root` (it may itself be one), in path order."""
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        raise RunsError(f"runs directory {runs_root} does not exist" if not runs_root.exists()
                        else f"{runs_root} is not a directory; pass the runs root (e.g. runs/)")
    rows = []
    for directory, subdirs, files in os.walk(runs_root):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith(".") and name != "tensorboard")
        if any(name in files for name in RUN_FILES):
            subdirs[:] = []   # a run directory holds no runs
            rows.append(read_run(Path(directory), runs_root))
    return rows


def format_accuracy(accuracy: dict | None) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in accuracy.items()) if accuracy else "-"


def table(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        epoch = f"{row['epoch']}/{row['epochs']}" if row["epochs"] is not None else str(row["epoch"] or "-")
        cells.append({"dataset": row["dataset"] or "?", "protocol": row["protocol"] or "?",
                      "shots": str(row["shots"] if row["shots"] is not None else "?"),
                      "seed": str(row["seed"] if row["seed"] is not None else "?"), "ablation": row["ablation"] or "?",
                      "status": row["status"], "epoch": epoch, "accuracy": format_accuracy(row["accuracy"]),
                      "job_id": row["job_id"] or "-"})
    widths = {c: max(len(c), *(len(cell[c]) for cell in cells)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(cell[c].ljust(widths[c]) for c in COLUMNS) for cell in cells]
    for row in rows:
        if row["problem"]:
            lines.append(f"unreadable {row['run_dir']}: {row['problem']}")
    return "\n".join(line.rstrip() for line in lines)

"""A grid of stage-2 runs: (dataset, shots, seed, ablation) cells, run one after another in this process or as
separate `python -m pipelines distill --config CELL.yaml` processes (at most N at once, one log file per cell).

A cell is a configuration (`DistillRun` with one shots count and one seed); an ablation is a set of KEY=VALUE
over its keys (a flag's name works as a key: `lambda_vac=0.5`). A cell's run directory is the one `distill` would
use, so a finished cell is recognised (final.json) and not run again, and `transagent report` finds every cell's
result. A failing cell does not stop the others; the caller gets every cell's outcome and decides the exit status.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.config import ConfigError
from pipelines.config.distill import NOT_IDENTITY, ROOTS, DistillRun, as_yaml, resolve
from pipelines.config.files import write_config
from pipelines.config.tree import flatten, from_mapping, parse_assignment, plain, resolve_key
from pipelines.distillation import distill, run_directory

log = logging.getLogger(__name__)
GRID_AXES = ("datasets", "ablations")          # the grid's own keys; everything else is a configuration key
CELL_KEYS = ("dataset", "shots", "seeds")      # set per cell, never by an ablation
DEFAULT = "default"                            # an ablation's value that means: the protocol's and preset's


class SweepError(ValueError):
    """A grid that cannot be expanded (unknown key, bad value, bad grid file); the message says which."""


# -------------------------------------------------------------------------------------------------- the grid
def parse_ablation(text: str) -> dict[str, object]:
    """'agents=dino,mae;lambda_vac=0.5' -> {'agents': 'dino,mae', 'loss.vac': 0.5}; pairs split on ';', a value
    'default' unsets the key for the cell (the protocol's and preset's value applies)."""
    ablation: dict[str, object] = {}
    for pair in (part.strip() for part in text.split(";")):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise SweepError(f"ablation {text!r}: expected NAME=VALUE[;NAME=VALUE], got {pair!r}")
        try:
            if value.strip().lower() == DEFAULT:
                ablation.update(dict.fromkeys(resolve_key(DistillRun, name, "ablation: "), DEFAULT))
            else:
                ablation.update(parse_assignment(DistillRun, pair, "ablation: "))
        except ConfigError as error:
            raise SweepError(str(error)) from None
    return _may_vary(ablation)


def check_ablation(ablation) -> dict[str, object]:
    """An ablation of a grid file: a NAME=VALUE[;...] text or an object of keys (nested sections allowed)."""
    if isinstance(ablation, str):
        return parse_ablation(ablation)
    if not isinstance(ablation, dict):
        raise SweepError(f"an ablation is a NAME=VALUE set or an object, got {ablation!r}")
    defaults = [name for name, value in ablation.items() if isinstance(value, str) and value.lower() == DEFAULT]
    try:
        values = from_mapping(DistillRun, {k: v for k, v in ablation.items() if k not in defaults}, "ablation: ")
        for name in defaults:
            values.update(dict.fromkeys(resolve_key(DistillRun, name, "ablation: "), DEFAULT))
    except ConfigError as error:
        raise SweepError(str(error)) from None
    return _may_vary(values)


def _may_vary(ablation: dict) -> dict:
    """Only what changes a cell's numbers varies between cells; where it runs and the cell axes are the sweep's."""
    fixed = [key for key in ablation if key in CELL_KEYS + NOT_IDENTITY]
    if fixed:
        raise SweepError(f"{', '.join(fixed)} cannot vary per cell (it is the grid's axis, or changes no number)")
    return ablation


def load_grid(path) -> dict:
    """A grid file (JSON or YAML): {"datasets": [...], "ablations": [{...} | "k=v;k=v", ...], plus any configuration
    key ("shots": [1, 16], "seeds": [1, 2], "protocol": ..., "optim": {"epochs": 5}, "lambda_lac": 10, ...)}."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SweepError(f"cannot read grid file {path}: {error}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"grid file {path}: expected an object")
    grid_settings(spec, f"grid file {path}: ")
    return spec


def grid_settings(spec: dict, where: str = "") -> dict[str, object]:
    """{dotted key: typed value} of a grid's configuration keys (all but its axes)."""
    try:
        return from_mapping(DistillRun, {k: v for k, v in spec.items() if k not in GRID_AXES}, where)
    except ConfigError as error:
        raise SweepError(str(error)) from None


def grid_file(path) -> tuple[dict, dict[str, object]]:
    """(the axes, the configuration keys) of a grid file."""
    spec = load_grid(path)
    return {k: v for k, v in spec.items() if k in GRID_AXES}, grid_settings(spec, f"grid file {path}: ")


def _as_list(name: str, value) -> list[str]:
    items = value if isinstance(value, list) else str(value).replace(" ", ",").split(",")
    items = [str(item).strip() for item in items if str(item).strip()]
    if not items:
        raise SweepError(f"{name}: the grid needs at least one value")
    return items


def expand_grid(spec: dict) -> list[DistillRun]:
    """Every (dataset, shots, seed, ablation) cell of a grid (`load_grid`'s form; configuration keys may also be
    dotted and typed already), in that nesting order; two ablations that resolve to the same run directory are
    kept once."""
    common = grid_settings(spec)
    datasets = _as_list("datasets", spec.get("datasets", common.get("dataset", DistillRun.dataset)))
    ablations = [check_ablation(a) for a in (spec.get("ablations") or [{}])]
    configs = {}
    for dataset, number in itertools.product(datasets, range(len(ablations))):
        values = {**common, "dataset": dataset}
        for key, value in ablations[number].items():
            if value == DEFAULT:
                values.pop(key, None)
            else:
                values[key] = value
        try:
            configs[dataset, number] = resolve(values)
        except (ConfigError, ValueError) as error:
            raise SweepError(str(error)) from None
    cells, seen = [], set()
    for dataset in datasets:
        first = configs[dataset, 0]
        for shots, seed, number in itertools.product(first.shots, first.seeds, range(len(ablations))):
            cell = dataclasses.replace(configs[dataset, number], shots=(shots,), seeds=(seed,))
            if run_directory(cell) not in seen:
                seen.add(run_directory(cell))
                cells.append(cell)
    return cells


def cell_name(cell: DistillRun) -> str:
    return run_directory(cell).relative_to(cell.runs_root).as_posix()


def cell_settings(cell: DistillRun) -> list[str]:
    """The cell as --set assignments: the keys whose values are not the fields' defaults (roots left out)."""
    defaults = flatten(DistillRun())
    return [f"{key}={value if isinstance(value, str) else json.dumps(plain(value))}"
            for key, value in flatten(cell).items() if value != defaults[key] and key not in ROOTS]


def is_finished(cell: DistillRun, rerun: bool = False) -> bool:
    """distill would only read final.json back: nothing to run (`rerun`: --force or --resume given)."""
    return (run_directory(cell) / "final.json").exists() and not rerun


def write_cell(cell: DistillRun, folder: Path) -> Path:
    """The cell's configuration file, what `distill --config` runs."""
    path = Path(folder) / (cell_name(cell).replace("/", "-") + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config(path, as_yaml(cell), f"sweep cell {cell_name(cell)}: transagent distill --config {path.name}")
    return path


def distill_command(config_file: Path, resume: bool = False, force: bool = False,
                    python: str = sys.executable) -> list[str]:
    """The `python -m pipelines distill --config CELL.yaml` command line of a cell."""
    return [python, "-m", "pipelines", "distill", "--config", str(config_file)] + \
        (["--resume"] if resume else []) + (["--force"] if force else [])


# ----------------------------------------------------------------------------------------------- running it
@dataclass
class CellResult:
    config: DistillRun
    status: str                 # done | exists | stopped | failed
    accuracy: dict | None = None
    seconds: float = 0.0
    error: str = ""
    log: Path | None = None


def finished_result(cell: DistillRun, status: str, seconds: float = 0.0, log_path=None) -> CellResult:
    path = run_directory(cell) / "final.json"
    try:
        final = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return CellResult(cell, "failed", None, seconds, f"cannot read {path}: {error}", log_path)
    return CellResult(cell, status, final.get("accuracy"), seconds, log=log_path)


@dataclass
class _Running:
    process: subprocess.Popen
    log: object            # the open log file
    started: float
    gpu: str | None


def _log_path(log_dir: Path, cell: DistillRun) -> Path:
    return Path(log_dir) / (cell_name(cell).replace("/", "-") + ".log")


def run_in_process(cells: list[DistillRun], log_dir, resume: bool = False, force: bool = False,
                   progress: bool = False) -> list[CellResult]:
    """Cells one after another in this process; a failure's traceback goes to its log file."""
    results = []
    for number, cell in enumerate(cells, 1):
        prefix = f"[{number}/{len(cells)}] {cell_name(cell)}"
        if is_finished(cell, resume or force):
            results.append(finished_result(cell, "exists"))
            log.info("%s: finished before, skipped", prefix)
            continue
        log.info("%s: running", prefix)
        start = time.perf_counter()
        try:
            final = distill(cell, resume=resume, force=force, progress=progress)
        except Exception as error:   # noqa: BLE001 - one bad cell must not end the sweep
            path = _log_path(log_dir, cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback.format_exc())
            results.append(CellResult(cell, "failed", None, time.perf_counter() - start,
                                      f"{type(error).__name__}: {error}", path))
            log.info("%s: FAILED: %s (traceback: %s)", prefix, results[-1].error, path)
            continue
        status = "stopped" if final.get("status") == "stopped" else "done"
        results.append(CellResult(cell, status, final.get("accuracy"), time.perf_counter() - start))
        log.info("%s: %s %s", prefix, status, format_accuracy(results[-1].accuracy))
    return results


def run_processes(cells: list[DistillRun], processes: int, log_dir, gpus: tuple[str, ...] = (),
                  resume: bool = False, force: bool = False, command=None,
                  poll_seconds: float = 0.2) -> list[CellResult]:
    """Each cell as its own process (default: `distill --config` of the cell's file under log_dir/cells), at most
    `processes` at once, output to one log file per cell under `log_dir`. With `gpus`, each process sees one of
    them (CUDA_VISIBLE_DEVICES), least used first."""
    if processes < 1:
        raise SweepError("--processes must be at least 1")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        def command(cell):
            return distill_command(write_cell(cell, log_dir / "cells"), resume, force)
    results: list[CellResult | None] = [None] * len(cells)
    pending = collections.deque(enumerate(cells))
    running: dict[int, _Running] = {}   # by cell index
    try:
        while pending or running:
            while pending and len(running) < processes:
                index, cell = pending.popleft()
                prefix = f"[{index + 1}/{len(cells)}] {cell_name(cell)}"
                if is_finished(cell, resume or force):
                    results[index] = finished_result(cell, "exists")
                    log.info("%s: finished before, skipped", prefix)
                    continue
                started = _start(command(cell), _log_path(log_dir, cell), gpus,
                                 [entry.gpu for entry in running.values()])
                running[index] = started
                log.info("%s: started (pid %s%s, log %s)", prefix, started.process.pid,
                         f", GPU {started.gpu}" if gpus else "", started.log.name)
            done = [index for index, entry in running.items() if entry.process.poll() is not None]
            for index in done:
                results[index] = result = _collect(cells[index], running.pop(index))
                outcome = f"FAILED: {result.error}" if result.status == "failed" else \
                    f"{result.status} {format_accuracy(result.accuracy)}"
                log.info("[%d/%d] %s: %s (log %s)", index + 1, len(cells), cell_name(cells[index]), outcome,
                         result.log)
            if running and not done:
                time.sleep(poll_seconds)
    except BaseException:
        for entry in running.values():   # only the processes this sweep started
            entry.process.terminate()
        for entry in running.values():
            entry.process.wait()
            entry.log.close()
        raise
    return results


def _start(command: list[str], log_path: Path, gpus, gpus_in_use) -> _Running:
    handle = open(log_path, "a")
    handle.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
    handle.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gpu = None
    if gpus:
        gpu = min(gpus, key=lambda g: (gpus_in_use.count(g), gpus.index(g)))
        env["CUDA_VISIBLE_DEVICES"] = gpu
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return _Running(process, handle, time.perf_counter(), gpu)


def _collect(cell: DistillRun, entry: _Running) -> CellResult:
    entry.log.close()
    seconds = time.perf_counter() - entry.started
    path, returncode = Path(entry.log.name), entry.process.returncode
    if returncode == 0 and (run_directory(cell) / "final.json").exists():
        return finished_result(cell, "done", seconds, path)
    if returncode == 0:
        return CellResult(cell, "stopped", None, seconds, log=path)
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error") or "Error:" in line]   # click's or a traceback's
    reason = (errors or lines or [""])[-1]
    return CellResult(cell, "failed", None, seconds, f"exit {returncode}: {reason}".strip(), path)


# ---------------------------------------------------------------------------------------------------- output
def format_accuracy(accuracy: dict | None) -> str:
    if not accuracy:
        return ""
    return " | ".join(f"{name} {value:.2f}" for name, value in accuracy.items())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def summary_table(results: list[CellResult]) -> str:
    rows = [{"dataset": r.config.dataset, "protocol": r.config.protocol, "shots": str(r.config.shot),
             "seed": str(r.config.seed), "ablation": run_directory(r.config).name, "status": r.status,
             "accuracy": format_accuracy(r.accuracy) or _clip(r.error, 100),
             "time": f"{r.seconds:.0f}s" if r.seconds else ""}
            for r in results]
    columns = ["dataset", "protocol", "shots", "seed", "ablation", "status", "time", "accuracy"]
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


__all__ = ["CellResult", "SweepError", "cell_name", "cell_settings", "check_ablation", "distill_command",
           "expand_grid", "finished_result", "is_finished", "load_grid", "parse_ablation", "run_in_process",
           "run_processes", "summary_table", "write_cell"]

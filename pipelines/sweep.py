"""A grid of stage-2 runs: (dataset, shots, seed, ablation) cells, run one after another in this process or as
separate `python -m pipelines distill` processes (at most N at once, one log file per cell).

A cell is a complete `DistillOptions`; its run directory is the one `distill` would use, so a finished cell is
recognised (final.json) and not run again, and `transagent report` finds every cell's result. A failing cell does
not stop the others; the caller gets every cell's outcome and decides the exit status.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from pipelines.distillation import ABLATION_FLAGS, DistillOptions, ablation_slug, run_directory

GRID_AXES = ("datasets", "shots", "seeds", "ablations")
CELL_FIELDS = ("dataset", "shots", "seed")        # set per cell, never common
CHOICES = {"protocol": ("base2novel", "fewshot", "cross", "dg"), "preset": ("paper", "tiny"),
           "router": ("mlp", "noisy-linear"), "precision": ("auto", "fp32", "bf16", "fp16"),
           "mac_student": ("standardized", "logits")}
_FIELDS = {f.name: f for f in dataclasses.fields(DistillOptions)}
COMMON_FIELDS = tuple(name for name in _FIELDS if name not in CELL_FIELDS)


class SweepError(ValueError):
    """A grid that cannot be expanded (unknown flag, bad value, bad grid file); the message says which."""


# -------------------------------------------------------------------------------------------------- the grid
def convert_option(name: str, value):
    """A DistillOptions field value from a string (command line) or a JSON value (grid file), checked.
    'default' is the field's default; 'none' (or null) unsets an optional field."""
    if name not in _FIELDS:
        raise SweepError(f"unknown option {name!r}; known: {', '.join(COMMON_FIELDS)}")
    field = _FIELDS[name]
    if isinstance(value, str) and value.strip().lower() == "default":
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    annotation = str(field.type)
    optional = "None" in annotation
    kind = annotation.split("|")[0].strip()
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "")):
        if not optional:
            raise SweepError(f"{name} needs a value")
        return None
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "Path":
            return Path(value)
        if kind.startswith("tuple"):  # layer lists: [3, 7, 11] in a grid file, "3+7+11" on the command line
            items = value if isinstance(value, (list, tuple)) else str(value).replace("+", " ").split()
            return tuple(sorted({int(item) for item in items}))
        if kind == "dict":
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise SweepError(f"{name}: expected {kind}, got {value!r}") from None
    value = str(value).strip()
    if name in CHOICES and value not in CHOICES[name]:
        raise SweepError(f"{name}: {value!r} is not one of {', '.join(CHOICES[name])}")
    return value


def parse_ablation(text: str) -> dict:
    """'agents=dino,mae;lambda_vac=0.5' -> {'agents': 'dino,mae', 'lambda_vac': 0.5}; pairs split on ';'."""
    ablation = {}
    for pair in (part.strip() for part in text.split(";")):
        if not pair:
            continue
        name, sep, value = pair.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise SweepError(f"ablation {text!r}: expected NAME=VALUE[;NAME=VALUE], got {pair!r}")
        ablation[name] = value.strip()
    return check_ablation(ablation)


def check_ablation(ablation: dict) -> dict:
    """Only the ablation flags may vary between cells (the rest is common to the sweep); values converted."""
    if not isinstance(ablation, dict):
        raise SweepError(f"an ablation is a NAME=VALUE set or a JSON object, got {ablation!r}")
    unknown = [name for name in ablation if name not in ABLATION_FLAGS]
    if unknown:
        raise SweepError(f"{', '.join(unknown)} cannot vary per cell; ablation flags: {', '.join(ABLATION_FLAGS)}")
    return {name: convert_option(name, value) for name, value in ablation.items()}


def _as_list(name: str, value, kind=str) -> list:
    items = value if isinstance(value, list) else str(value).replace(" ", ",").split(",")
    try:
        items = [kind(item) for item in items if str(item).strip() != ""]
    except (TypeError, ValueError):
        raise SweepError(f"{name}: expected a list of {kind.__name__}, got {value!r}") from None
    if not items:
        raise SweepError(f"{name}: the grid needs at least one value")
    return items


def load_grid(path) -> dict:
    """A JSON grid file: {"datasets": [...], "shots": [...], "seeds": [...], "ablations": [{...} | "k=v;k=v", ...],
    plus any common DistillOptions field ("protocol", "preset", "epochs", "device", ...)}."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SweepError(f"cannot read grid file {path}: {error}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"grid file {path}: expected a JSON object")
    unknown = [key for key in spec if key not in GRID_AXES and key not in COMMON_FIELDS]
    if unknown:
        raise SweepError(f"grid file {path}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(GRID_AXES + COMMON_FIELDS)}")
    return spec


def expand_grid(spec: dict) -> list[DistillOptions]:
    """Every (dataset, shots, seed, ablation) cell of a spec, in that nesting order; duplicates (two ablations
    that resolve to the same run directory) are kept once."""
    datasets = _as_list("datasets", spec.get("datasets", "eurosat"))
    shots = _as_list("shots", spec.get("shots", 16), int)
    seeds = _as_list("seeds", spec.get("seeds", 1), int)
    ablations = [parse_ablation(a) if isinstance(a, str) else check_ablation(a)
                 for a in (spec.get("ablations") or [{}])]
    common = {name: convert_option(name, spec[name]) for name in COMMON_FIELDS if name in spec}
    cells, seen = [], set()
    for dataset, k, seed, ablation in itertools.product(datasets, shots, seeds, ablations):
        options = DistillOptions(**{**common, **ablation, "dataset": dataset, "shots": k, "seed": seed})
        directory = run_directory(options)
        if directory not in seen:
            seen.add(directory)
            cells.append(options)
    return cells


def cell_name(options: DistillOptions) -> str:
    return f"{options.dataset}/{options.protocol}/shots{options.shots}/seed{options.seed}/{ablation_slug(options)}"


def is_finished(options: DistillOptions) -> bool:
    """distill would only read final.json back: nothing to run."""
    return (run_directory(options) / "final.json").exists() and not (options.force or options.resume)


def distill_command(options: DistillOptions, python: str = sys.executable) -> list[str]:
    """The `python -m pipelines distill ...` command line that trains exactly this cell."""
    o = options
    command = [python, "-m", "pipelines", "distill", "--dataset", o.dataset, "--data-root", str(o.data_root),
               "--cache-root", str(o.cache_root), "--runs-root", str(o.runs_root), "--preset", o.preset,
               "--agents", o.agents, "--protocol", o.protocol, "--shots", str(o.shots), "--seeds", str(o.seed),
               "--lambda-vac", repr(o.lambda_vac), "--lambda-lac", repr(o.lambda_lac),
               "--lambda-rel", repr(o.lambda_rel), "--lambda-mac", repr(o.lambda_mac),
               "--temperature", repr(o.temperature), "--mac-student", o.mac_student, "--router", o.router,
               "--device", o.device,
               "--precision", o.precision, "--workers", str(o.workers)]
    for flag, value in (("--views", o.views), ("--epochs", o.epochs), ("--prompt-depth", o.prompt_depth),
                        ("--stop-after-epoch", o.stop_after_epoch), ("--dataset-name", o.dataset_name)):
        if value is not None:
            command += [flag, str(value)]
    for flag, on in (("--eval-initial", o.eval_initial), ("--resume", o.resume), ("--force", o.force)):
        if on:
            command.append(flag)
    if o.layers is not None:
        command += ["--layers", ",".join(str(layer) for layer in o.layers)]
    for agent, fingerprint in sorted(o.pins.items()):
        command += ["--cache-fingerprint", f"{agent}={fingerprint}"]
    if o.report_to:
        command += ["--report-to", o.report_to]
    return command


# ----------------------------------------------------------------------------------------------- running it
@dataclass
class CellResult:
    options: DistillOptions
    status: str                 # done | exists | stopped | failed
    accuracy: dict | None = None
    seconds: float = 0.0
    error: str = ""
    log: Path | None = None


def _finished_result(options: DistillOptions, status: str, seconds: float = 0.0, log=None) -> CellResult:
    path = run_directory(options) / "final.json"
    try:
        final = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return CellResult(options, "failed", None, seconds, f"cannot read {path}: {error}", log)
    return CellResult(options, status, final.get("accuracy"), seconds, log=log)


@dataclass
class _Running:
    process: subprocess.Popen
    log: object            # the open log file
    started: float
    gpu: str | None


def _log_path(log_dir: Path, options: DistillOptions) -> Path:
    return Path(log_dir) / (cell_name(options).replace("/", "-") + ".log")


def run_in_process(cells: list[DistillOptions], log_dir, echo=print) -> list[CellResult]:
    """Cells one after another in this process; a failure's traceback goes to its log file."""
    from pipelines.distillation import distill

    results = []
    for number, options in enumerate(cells, 1):
        prefix = f"[{number}/{len(cells)}] {cell_name(options)}"
        if is_finished(options):
            results.append(_finished_result(options, "exists"))
            echo(f"{prefix}: finished before, skipped")
            continue
        echo(f"{prefix}: running")
        start = time.perf_counter()
        try:
            final = distill(options)
        except Exception as error:   # one bad cell must not end the sweep
            log = _log_path(log_dir, options)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            results.append(CellResult(options, "failed", None, time.perf_counter() - start,
                                      f"{type(error).__name__}: {error}", log))
            echo(f"{prefix}: FAILED: {results[-1].error} (traceback: {log})")
            continue
        status = "stopped" if final.get("status") == "stopped" else "done"
        results.append(CellResult(options, status, final.get("accuracy"), time.perf_counter() - start))
        echo(f"{prefix}: {status} {format_accuracy(results[-1].accuracy)}")
    return results


def run_processes(cells: list[DistillOptions], processes: int, log_dir, gpus: tuple[str, ...] = (), echo=print,
                  command=distill_command, poll_seconds: float = 0.2) -> list[CellResult]:
    """Each cell as its own process (`command(options)`), at most `processes` at once, output to one log file per
    cell under `log_dir`. With `gpus`, each process sees one of them (CUDA_VISIBLE_DEVICES), least used first."""
    if processes < 1:
        raise SweepError("--processes must be at least 1")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[CellResult | None] = [None] * len(cells)
    pending = collections.deque(enumerate(cells))
    running: dict[int, _Running] = {}   # by cell index
    try:
        while pending or running:
            while pending and len(running) < processes:
                index, options = pending.popleft()
                prefix = f"[{index + 1}/{len(cells)}] {cell_name(options)}"
                if is_finished(options):
                    results[index] = _finished_result(options, "exists")
                    echo(f"{prefix}: finished before, skipped")
                    continue
                started = _start(command(options), _log_path(log_dir, options), gpus,
                                 [entry.gpu for entry in running.values()])
                running[index] = started
                echo(f"{prefix}: started (pid {started.process.pid}" + (f", GPU {started.gpu}" if gpus else "")
                     + f", log {started.log.name})")
            done = [index for index, entry in running.items() if entry.process.poll() is not None]
            for index in done:
                results[index] = _collect(cells[index], running.pop(index))
                result = results[index]
                outcome = f"FAILED: {result.error}" if result.status == "failed" else \
                    f"{result.status} {format_accuracy(result.accuracy)}"
                echo(f"[{index + 1}/{len(cells)}] {cell_name(cells[index])}: {outcome} (log {result.log})")
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


def _collect(options, entry: _Running) -> CellResult:
    entry.log.close()
    seconds = time.perf_counter() - entry.started
    log, returncode = Path(entry.log.name), entry.process.returncode
    if returncode == 0 and (run_directory(options) / "final.json").exists():
        return _finished_result(options, "done", seconds, log)
    if returncode == 0:
        return CellResult(options, "stopped", None, seconds, log=log)
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error") or "Error:" in line]   # click's or a traceback's
    reason = (errors or lines or [""])[-1]
    return CellResult(options, "failed", None, seconds, f"exit {returncode}: {reason}".strip(), log)


# ---------------------------------------------------------------------------------------------------- output
def format_accuracy(accuracy: dict | None) -> str:
    if not accuracy:
        return ""
    return " | ".join(f"{name} {value:.2f}" for name, value in accuracy.items())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def summary_table(results: list[CellResult]) -> str:
    rows = [{"dataset": r.options.dataset, "protocol": r.options.protocol, "shots": str(r.options.shots),
             "seed": str(r.options.seed), "ablation": ablation_slug(r.options), "status": r.status,
             "accuracy": format_accuracy(r.accuracy) or _clip(r.error, 100),
             "time": f"{r.seconds:.0f}s" if r.seconds else ""}
            for r in results]
    columns = ["dataset", "protocol", "shots", "seed", "ablation", "status", "time", "accuracy"]
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


__all__ = ["CellResult", "SweepError", "cell_name", "check_ablation", "convert_option", "distill_command",
           "expand_grid", "is_finished", "load_grid", "parse_ablation", "run_in_process", "run_processes",
           "summary_table"]

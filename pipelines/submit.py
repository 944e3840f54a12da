"""What each stage submits through the launcher (`pipelines.launch`): a sweep cell's `distill --config CELL.yaml`,
and the `extract` of one (dataset, agent).

Everything a task would do first and that two tasks must not race on happens here, on the submitting node: the
datasets are prepared and the few-shot selections drawn; a --force sweep's run directories are cleared (so no
task, and no retry, ever deletes one). An SD extraction waits for the vicuna task of its dataset (SD is
conditioned on the Vicuna descriptions, read from the vicuna cache).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from cache_schema.lock import HEARTBEAT, STALE_AFTER
from pipelines.config.distill import DistillPaths
from pipelines.datasets import dataset_slug, load_dataset
from pipelines.distillation import run_directory
from pipelines.launch import LaunchOptions, Task, TaskState, launch, make_executor, run_task
from pipelines.protocols import training_set
from pipelines.sweep import cell_name, write_cell

JOB_RECORD = "job.json"               # in a sweep cell's run directory: its job ids, attempts, status
ORDERED_AFTER = {"sd": ("vicuna",)}   # extract: agent -> agents of the same dataset it waits for


# ----------------------------------------------------------------------------------------------- stage 2
def sweep_tasks(cells, cells_dir, resume: bool = False) -> list[Task]:
    """One task per cell: `distill --config` of the cell's file (absolute roots) under `cells_dir`, resumed on
    retry; its job record lives in the run directory, where `transagent runs ls` finds it."""
    tasks = []
    for cell in cells:
        cell = dataclasses.replace(cell, paths=DistillPaths(*(Path(root).absolute() for root in (
            cell.paths.data_root, cell.paths.cache_root, cell.paths.runs_root))))
        argv = ["distill", "--config", str(write_cell(cell, cells_dir).absolute())]
        directory = run_directory(cell)
        tasks.append(Task(cell_name(cell), argv + (["--resume"] if resume else []),
                          finished=(directory / "final.json").exists, retry_argv=argv + ["--resume"],
                          record=directory / JOB_RECORD))
    return tasks


def prepare_cells(cells) -> None:
    """On the submitting node, what every cell's distill would do first: prepare and check each dataset (a
    synthetic one is generated) and draw the few-shot selections, so that tasks never race to write them."""
    datasets = {}
    for cell in cells:
        key = (cell.dataset, str(Path(cell.paths.data_root).absolute()))
        if key not in datasets:
            datasets[key] = load_dataset(cell.dataset, cell.paths.data_root)
        training_set(datasets[key], cell.protocol, cell.shot, cell.seed, cell.paths.data_root)


def clear_forced(cells) -> None:
    """--force, done here as distill would do it, so that no task (and no retry) ever deletes a run directory."""
    for cell in cells:
        if run_directory(cell).exists():
            shutil.rmtree(run_directory(cell))


def submit_sweep(cells, options: LaunchOptions, job_dir, resume: bool = False, force: bool = False,
                 function=run_task) -> list[TaskState]:
    """The sweep through submitit: datasets are prepared here, --force cells cleared here, then one job array."""
    prepare_cells(cells)
    if force:
        clear_forced(cells)
    executor = make_executor(options, job_dir, "transagent-sweep")
    return launch(sweep_tasks(cells, Path(job_dir) / "cells", resume), executor, options, function)


# ----------------------------------------------------------------------------------------------- stage 1
def extract_argv(params: dict, dataset: str, agent: str) -> list[str]:
    """The `extract` command line of one (dataset, agent), from the extract command's parameters."""
    p = params

    def absolute(path) -> str:
        return str(Path(path).absolute())

    argv = ["extract", "--dataset", dataset, "--agents", agent, "--data-root", absolute(p["data_root"]),
            "--cache-root", absolute(p["cache_root"]), "--preset", p["preset"], "--protocol", p["protocol"],
            "--shots", ",".join(str(k) for k in p["shots"]), "--seeds", ",".join(str(s) for s in p["seeds"]),
            "--split", p["split"], "--views", str(p["views"]), "--view-seed", str(p["view_seed"]),
            "--layers", "all" if p["layers"] is None else ",".join(str(layer) for layer in p["layers"]),
            "--token-pool", str(p["token_pool"]), "--dtype", p["dtype"], "--max-bytes", repr(float(p["max_bytes"])),
            "--batch-size", str(p["batch_size"]), "--device", p["device"], "--backend", p["backend"],
            "--on-error", p["on_error"]]
    if p.get("dataset_name"):
        argv += ["--dataset-name", p["dataset_name"]]
    if agent in p["agent_paths"]:
        argv += ["--agent-path", f"{agent}={absolute(p['agent_paths'][agent])}"]
    if agent in p["descriptions"]:
        argv += ["--descriptions", f"{agent}={absolute(p['descriptions'][agent])}"]
    for key, value in sorted(p.get("agent_settings", {}).get(agent, {}).items()):
        argv += ["--agent-option", f"{agent}:{key}={_setting_text(value)}"]
    if p.get("log_path"):
        argv += ["--log", absolute(p["log_path"])]
    if p.get("strict"):
        argv.append("--strict")
    if p.get("wait"):
        argv += ["--wait", repr(float(p["wait"]))]
    return argv


def _setting_text(value) -> str:
    """An --agent-option VALUE that parses back to `value` (a string stays bare unless it would read as JSON)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def _with_wait(argv: list[str], seconds: float) -> list[str]:
    """argv with `--wait` at least `seconds`."""
    if "--wait" not in argv:
        return argv + ["--wait", repr(float(seconds))]
    at = argv.index("--wait") + 1
    return argv[:at] + [repr(max(float(argv[at]), float(seconds)))] + argv[at + 1:]


def extraction_tasks(plans: dict[str, list], params: dict) -> list[Task]:
    """One task per (dataset, agent) with incomplete caches; `plans` maps each dataset to its jobs left to do
    (what `extract --dry-run` planned). A task is finished when every cache of its agent holds its rows."""
    from extract.runner import is_complete

    cache_root = params["cache_root"]
    tasks = []
    for dataset, jobs in plans.items():
        slug = dataset_slug(dataset, params.get("dataset_name"))
        by_agent: dict[str, list] = {}
        for job in jobs:
            by_agent.setdefault(job.spec.name, []).append(job)
        for agent, agent_jobs in by_agent.items():
            after = tuple(f"{slug}/{other}" for other in ORDERED_AFTER.get(agent, ()) if other in by_agent)
            argv = extract_argv(params, dataset, agent)
            # a killed task's writer lease goes stale by its heartbeat: its retry waits for that, not refused
            tasks.append(Task(f"{slug}/{agent}", argv,
                              finished=lambda agent_jobs=agent_jobs: all(is_complete(job, cache_root)
                                                                         for job in agent_jobs),
                              retry_argv=_with_wait(argv, STALE_AFTER + HEARTBEAT), after=after))
    return tasks


def submit_extraction(plans: dict[str, list], params: dict, options: LaunchOptions, job_dir,
                      function=run_task) -> list[TaskState]:
    """The extraction through submitit: one job per (dataset, agent), all writing to the same cache root. The
    datasets' extraction logs get a line per submitted job."""
    from extract.runner import log

    tasks = extraction_tasks(plans, params)
    executor = make_executor(options, job_dir, "transagent-extract")
    states = launch(tasks, executor, options, function)
    for state in states:
        if state.jobs:
            slug, agent = state.task.name.rsplit("/", 1)
            log_path = params.get("log_path") or Path(params["cache_root"]) / slug / "extract.jsonl"
            log(log_path, {"event": "submitit", "agent": agent, "status": state.status, "job_ids": state.job_ids,
                           "log": str(state.log), "note": state.note}, 0)
    return states

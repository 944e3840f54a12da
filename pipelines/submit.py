"""What each stage submits through the launcher (`pipelines.launch`): a sweep cell's `distill --config CELL.yaml`,
and the `extract --config TASK.yaml` of one (dataset, agent).

Everything a task would do first and that two tasks must not race on happens here, on the submitting node: the
datasets are prepared and the few-shot selections drawn; a --force sweep's run directories are cleared (so no
task, and no retry, ever deletes one). An SD extraction waits for the vicuna task of its dataset (SD is
conditioned on the Vicuna descriptions, read from the vicuna cache).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from cache_schema.lock import HEARTBEAT, STALE_AFTER
from extract.runner import is_complete
from extract.runner import log as journal
from pipelines.config.distill import absolute_roots
from pipelines.config.extract import ExtractOptions
from pipelines.config.files import write_config
from pipelines.config.tree import nested
from pipelines.datasets import dataset_slug, load_dataset
from pipelines.distillation import run_directory
from pipelines.extract_run import log_path
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
        cell = absolute_roots(cell)
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
        key = (cell.dataset, str(Path(cell.data_root).absolute()))
        if key not in datasets:
            datasets[key] = load_dataset(cell.dataset, cell.data_root)
        training_set(datasets[key], cell.protocol, cell.shot, cell.seed, cell.data_root)


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
def task_config(options: ExtractOptions, agent: str) -> ExtractOptions:
    """One agent's extraction of one dataset, roots absolute: what its task runs on its node."""
    def absolute(path):
        return None if path is None else Path(path).absolute()

    return dataclasses.replace(
        options, agents=agent, data_root=absolute(options.data_root), cache_root=absolute(options.cache_root),
        log=absolute(options.log),
        agent_paths={name: str(absolute(path)) for name, path in options.agent_paths.items() if name == agent},
        descriptions={name: str(absolute(path)) for name, path in options.descriptions.items() if name == agent},
        agent_settings={name: value for name, value in options.agent_settings.items() if name == agent})


def extraction_tasks(plans: dict[str, list], configs: dict[str, ExtractOptions], tasks_dir) -> list[Task]:
    """One task per (dataset, agent) with incomplete caches: `extract --config` of its file under `tasks_dir`.
    `plans` maps each dataset to its jobs left to do (what `extract --dry-run` planned), `configs` to its
    configuration. A task is finished when every cache of its agent holds its rows."""
    tasks = []
    for dataset, jobs in plans.items():
        options = configs[dataset]
        slug = dataset_slug(dataset, options.dataset_name)
        by_agent: dict[str, list] = {}
        for job in jobs:
            by_agent.setdefault(job.spec.name, []).append(job)
        for agent, agent_jobs in by_agent.items():
            after = tuple(f"{slug}/{other}" for other in ORDERED_AFTER.get(agent, ()) if other in by_agent)
            path = Path(tasks_dir) / f"{slug}-{agent}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_config(path, nested(task_config(options, agent)),
                         f"extraction task {slug}/{agent}: transagent extract --config {path.name}")
            argv = ["extract", "--config", str(path.absolute())]
            # a killed task's writer lease goes stale by its heartbeat: its retry waits for that, not refused
            tasks.append(Task(f"{slug}/{agent}", argv,
                              finished=lambda jobs=agent_jobs, root=options.cache_root: all(
                                  is_complete(job, root) for job in jobs),
                              retry_argv=argv + ["--wait", repr(max(options.wait, STALE_AFTER + HEARTBEAT))],
                              after=after))
    return tasks


def submit_extraction(plans: dict[str, list], configs: dict[str, ExtractOptions], options: LaunchOptions, job_dir,
                      function=run_task) -> list[TaskState]:
    """The extraction through submitit: one job per (dataset, agent), all writing to the same cache root. The
    datasets' extraction logs get a line per submitted job."""
    executor = make_executor(options, job_dir, "transagent-extract")
    states = launch(extraction_tasks(plans, configs, Path(job_dir) / "tasks"), executor, options, function)
    by_slug = {dataset_slug(dataset, config.dataset_name): config for dataset, config in configs.items()}
    for state in states:
        if state.jobs:
            slug, agent = state.task.name.rsplit("/", 1)
            journal(log_path(by_slug[slug]), {"event": "submitit", "agent": agent, "status": state.status,
                                              "job_ids": state.job_ids, "log": str(state.log), "note": state.note}, 0)
    return states

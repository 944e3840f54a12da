"""Stage 1 and stage 2 on a cluster scheduler, through submitit (SLURM; its local executor needs no scheduler).

A task is one `transagent` command line (`pipelines.submit` makes them: a sweep cell's `distill --config`, or
the `extract` of one (dataset, agent)). A submission of several is one job array. On the compute node `run_task`
runs the command in the job's own process, with HF_HUB_OFFLINE=1: downloads, dataset preparation and the checks
happen on the submitting node, before anything is submitted. Jobs return nothing that is read here: submitit
pickles a job's result on the node, and this module never unpickles one. Whether a task finished is read from
what it writes — final.json, the caches' manifests — and a task whose job ended without finishing is submitted
again (`--retries N`); it resumes (distill with --resume, an extraction from its journals).

Ordering: a task may wait for others of its submission (`Task.after`). While waiting, the launcher submits the
waiting task once its prerequisites finished; with --no-wait on SLURM it is submitted at once with an `afterok`
dependency.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from pipelines.cli import main

log = logging.getLogger(__name__)
LAUNCHERS = ("local", "submitit")
CLUSTERS = ("auto", "slurm", "local")
TERMINAL = ("done", "exists", "failed", "not run")


class LaunchError(ValueError):
    """A submission that cannot be made as asked; the message says which flag or task."""


# ----------------------------------------------------------------------------------------------- options
@dataclass
class LaunchOptions:
    cluster: str = "auto"                 # auto: SLURM where sbatch exists, else submitit's local executor
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_minutes: int = 720
    array_parallelism: int | None = None
    setup: tuple[str, ...] = ()           # shell lines before the task (module load, source venv/bin/activate)
    sbatch: dict = field(default_factory=dict)   # more sbatch options, e.g. {"constraint": "a100"}
    retries: int = 0
    wait: bool = True
    job_dir: Path | None = None
    poll_seconds: float = 10.0

    @classmethod
    def from_params(cls, params: dict) -> "LaunchOptions":
        """From the click parameters of `opt.launcher_options` (they are removed from `params`)."""
        take = {name: params.pop(name) for name in list(params) if name in LAUNCH_PARAMS}
        return cls(cluster=take["cluster"], partition=take["slurm_partition"], account=take["slurm_account"],
                   qos=take["slurm_qos"], gpus_per_task=take["slurm_gpus_per_task"],
                   cpus_per_task=take["slurm_cpus_per_task"], mem_gb=take["slurm_mem_gb"],
                   time_minutes=parse_time(take["slurm_time"]), array_parallelism=take["slurm_array_parallelism"],
                   setup=tuple(take["slurm_setup"]), sbatch=dict(take["slurm_option"]), retries=take["retries"],
                   wait=not take["no_wait"], job_dir=take["job_dir"], poll_seconds=take["poll_seconds"])


LAUNCH_PARAMS = ("cluster", "slurm_partition", "slurm_account", "slurm_qos", "slurm_gpus_per_task",
                 "slurm_cpus_per_task", "slurm_mem_gb", "slurm_time", "slurm_array_parallelism", "slurm_setup",
                 "slurm_option", "retries", "no_wait", "job_dir", "poll_seconds")


def parse_time(value) -> int:
    """SLURM's time formats -> minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise LaunchError(f"--slurm-time {value!r}: expected minutes or [D-]HH:MM[:SS], e.g. 90 or 12:00:00")
    days, first, second, third = match.groups()
    numbers = [int(first)] + [int(x) for x in (second, third) if x is not None]
    if days is not None:   # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        total = int(days) * 1440 + hours * 60 + minutes + seconds / 60
    elif len(numbers) == 1:
        total = numbers[0]
    elif len(numbers) == 2:   # M:S
        total = numbers[0] + numbers[1] / 60
    else:
        total = numbers[0] * 60 + numbers[1] + numbers[2] / 60
    minutes = max(1, -(-int(total * 60) // 60))
    return minutes


def make_executor(options: LaunchOptions, folder, name: str):
    """A submitit executor: SLURM or the local one, with the resources of one task (one job per task)."""
    import submitit   # not for the commands that only name the launcher's flags

    cluster = None if options.cluster == "auto" else options.cluster
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except (RuntimeError, ValueError) as error:
        raise LaunchError(f"--cluster {options.cluster}: {error}") from None
    parameters = {"name": name, "timeout_min": options.time_minutes, "tasks_per_node": 1, "nodes": 1,
                  "gpus_per_node": options.gpus_per_task, "cpus_per_task": options.cpus_per_task,
                  "mem_gb": options.mem_gb, "slurm_partition": options.partition, "slurm_account": options.account,
                  "slurm_qos": options.qos, "slurm_array_parallelism": options.array_parallelism,
                  "slurm_setup": list(options.setup) or None,
                  "slurm_additional_parameters": dict(options.sbatch) or None}
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    return executor


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    name: str                              # what the status lines call it: a cell, or dataset/agent
    argv: list[str]                        # the `transagent` command line, without the program
    finished: Callable[[], bool]           # read on the submitting node: final.json, the caches' status
    retry_argv: list[str] | None = None    # the command line of a retry (default: argv)
    after: tuple[str, ...] = ()            # names of tasks of the same submission that must finish first
    record: Path | None = None             # a JSON record of the task's jobs, rewritten on every change


@dataclass
class TaskState:
    task: Task
    status: str = "waiting"     # waiting | submitted | done | exists | failed | not run
    jobs: list = field(default_factory=list)
    note: str = ""

    @property
    def job_ids(self) -> list[str]:
        return [str(job.job_id) for job in self.jobs]

    @property
    def log(self) -> Path | None:
        return Path(self.jobs[-1].paths.stdout) if self.jobs else None


def run_task(argv: list[str]) -> None:
    """The job's body on the compute node: one `transagent` command, offline. Returns nothing on purpose."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    print(f"transagent {shlex.join(argv)}\n  pid {os.getpid()} on {socket.gethostname()}", flush=True)
    try:
        main.main(args=list(argv), prog_name="transagent", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        raise RuntimeError(error.format_message()) from None


def launch(tasks: list[Task], executor, options: LaunchOptions, function=run_task) -> list[TaskState]:
    """Submit the tasks that are not finished yet (one job array per round), then, unless options.wait is off,
    follow them to the end: re-submit a task whose job ended without finishing (at most options.retries times),
    submit a waiting task when its prerequisites finished, print a status line whenever the counts change."""
    states = {task.name: TaskState(task) for task in tasks}
    for state in states.values():
        if state.task.finished():
            state.status = "exists"
    blocked = [s for s in states.values() if s.status == "waiting" and not _ready(s, states)]
    slurm = getattr(executor, "cluster", "") == "slurm"
    if not options.wait and blocked and not slurm:
        raise LaunchError(f"{', '.join(s.task.name for s in blocked)} wait(s) for other tasks of this submission; "
                          "without SLURM dependencies that needs the launcher to wait: drop --no-wait, or submit "
                          "them in a second command once the first finished")
    if options.retries and not options.wait:
        log.warning("note: --retries needs the launcher to wait; with --no-wait a failed task stays failed")
    try:
        _submit([s for s in states.values() if _ready(s, states)], executor, function)
        if not options.wait:
            if blocked:
                _submit_with_dependencies(blocked, states, executor, options, function)
            return list(states.values())
        _follow(states, executor, options, function)
    except KeyboardInterrupt:
        running = [s for s in states.values() if s.status == "submitted"]
        log.warning("stopped waiting for %d job(s) (on SLURM they keep running; scancel stops them): %s",
                    len(running), ", ".join(f"{s.task.name} ({s.job_ids[-1]})" for s in running))
        raise
    return list(states.values())


def _prerequisites(state: TaskState, states: dict) -> list[TaskState]:
    return [states[name] for name in state.task.after if name in states]


def _ready(state: TaskState, states: dict) -> bool:
    return state.status == "waiting" and all(p.status in ("done", "exists") for p in _prerequisites(state, states))


def _submit(ready: list[TaskState], executor, function, retry: bool = False) -> None:
    if not ready:
        return
    argvs = [(s.task.retry_argv or s.task.argv) if retry else s.task.argv for s in ready]
    try:
        with executor.batch():
            jobs = [executor.submit(function, argv) for argv in argvs]
    except Exception as error:  # noqa: BLE001 - sbatch, the file system, pickling: all end the submission
        raise LaunchError(f"submission of {', '.join(s.task.name for s in ready)} failed: "
                          f"{type(error).__name__}: {error}") from None
    for state, job in zip(ready, jobs, strict=True):
        state.jobs.append(job)
        state.status = "submitted"
        attempt = f" (attempt {len(state.jobs)})" if len(state.jobs) > 1 else ""
        log.info("submitted %s: job %s%s, log %s", state.task.name, job.job_id, attempt, state.log)
        _write_record(state, executor)


def _submit_with_dependencies(waiting, states, executor, options: LaunchOptions, function) -> None:
    """--no-wait on SLURM: a waiting task goes in now, held by the scheduler until its prerequisites succeeded."""
    for state in waiting:
        ids = [job_id for p in _prerequisites(state, states) for job_id in p.job_ids[-1:]]
        executor.update_parameters(slurm_additional_parameters={**options.sbatch,
                                                                "dependency": "afterok:" + ":".join(ids)})
        try:
            _submit([state], executor, function)
        finally:
            executor.update_parameters(slurm_additional_parameters=dict(options.sbatch))


def _follow(states: dict, executor, options: LaunchOptions, function) -> None:
    last_line = ""
    while True:
        for state in states.values():
            if state.status == "submitted" and state.jobs[-1].done():
                _settle(state, executor, options, function)
            elif state.status == "waiting" and any(p.status in ("failed", "not run")
                                                   for p in _prerequisites(state, states)):
                state.status, state.note = "not run", "a task it waits for failed"
                log.info("not run   %s: %s", state.task.name, state.note)
                _write_record(state, executor)
        _submit([s for s in states.values() if _ready(s, states)], executor, function)
        line = status_line(states.values())
        if line != last_line:
            log.info("%s  %s", time.strftime("%H:%M:%S"), line)
            last_line = line
        if all(state.status in TERMINAL for state in states.values()):
            return
        time.sleep(options.poll_seconds)


def _settle(state: TaskState, executor, options: LaunchOptions, function) -> None:
    """A job of the task ended: finished, retried, or failed (what it wrote decides, not what it returned)."""
    job = state.jobs[-1]
    if state.task.finished():
        state.status = "done"
        log.info("done      %s (job %s)", state.task.name, job.job_id)
    elif len(state.jobs) <= options.retries:
        log.info("retrying  %s: job %s ended (%s) without finishing; log %s", state.task.name, job.job_id, job.state,
                 state.log)
        _submit([state], executor, function, retry=True)
        return
    else:
        state.status = "failed"
        state.note = f"job {job.job_id} ended ({job.state}) without finishing"
        log.info("FAILED    %s: %s%s; log %s", state.task.name, state.note,
                 f" after {len(state.jobs)} attempts" if len(state.jobs) > 1 else "", state.log)
    _write_record(state, executor)


def status_line(states) -> str:
    """'4 task(s): 1 pending, 2 running, 1 done' (scheduler states for submitted tasks)."""
    counts: dict[str, int] = {}
    states = list(states)
    for state in states:
        status = state.status
        if status == "submitted":
            status = "pending" if str(state.jobs[-1].state).upper() in ("PENDING", "UNKNOWN", "REQUEUED") \
                else "running"
        counts[status] = counts.get(status, 0) + 1
    order = ("waiting", "pending", "running", "done", "exists", "failed", "not run")
    return f"{len(states)} task(s): " + ", ".join(f"{counts[s]} {s}" for s in order if s in counts)


def _write_record(state: TaskState, executor) -> None:
    if state.task.record is None:
        return
    record = {"launcher": "submitit", "cluster": getattr(executor, "cluster", "?"), "task": state.task.name,
              "job_id": state.job_ids[-1] if state.jobs else None, "job_ids": state.job_ids,
              "attempts": len(state.jobs), "status": state.status, "note": state.note,
              "log": str(state.log) if state.log else None, "command": shlex.join(["transagent", *state.task.argv]),
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = state.task.record
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def summary(states: list[TaskState]) -> str:
    """One row per task: its status and job ids."""
    width = max((len(s.task.name) for s in states), default=4)
    lines = [f"{'TASK':<{width}}  STATUS    JOBS"]
    lines += [f"{state.task.name:<{width}}  {state.status:<8}  {','.join(state.job_ids) or '-'}"
              + (f"  ({state.note})" if state.note else "") for state in states]
    return "\n".join(lines)

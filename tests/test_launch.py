"""Submitting through submitit (its local executor: real jobs in their own processes, no SLURM): the same results
as the in-process path, retries of killed tasks, ordering, job records; TensorBoard records read back."""
import dataclasses
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import launcher_tasks
from pipelines.cli import main
from pipelines.commands.distill import distill as distill_cli
from pipelines.commands.extract import extract as extract_cli
from pipelines.config.cli import layers
from pipelines.config.distill import DistillRun, resolve
from pipelines.distillation import run_directory
from pipelines.launch import LaunchError, LaunchOptions, Task, launch, make_executor, parse_time
from pipelines.config.extract import ExtractOptions
from pipelines.config.tree import build
from pipelines.submit import clear_forced, extraction_tasks, sweep_tasks

TESTS = Path(__file__).parent


def extract_config(args) -> ExtractOptions:
    """The configuration `extract ARGS` would extract (its first dataset)."""
    context = extract_cli.make_context("extract", [str(a) for a in args])
    config = build(ExtractOptions, layers(context, ExtractOptions, skip=("dataset",)).merged())
    datasets = context.params["datasets"]
    return dataclasses.replace(config, dataset=datasets.split(",")[0]) if datasets else config


@pytest.fixture
def job_env(monkeypatch):
    """Jobs import the test helpers, and run single-threaded like this process, so results compare exactly."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_time_formats_argv_round_trip_and_flag_checks(tmp_path):
    assert [parse_time(t) for t in ("90", "30:30", "12:00:00", "1-00", "1-02:30", "2-00:00:30")] == \
        [90, 31, 720, 1440, 1590, 2881]
    with pytest.raises(LaunchError, match="--slurm-time"):
        parse_time("12h")
    # an extraction task's configuration file, read back by the extract command itself, is the same configuration
    args = ["--dataset", "a,b", "--data-root", "d", "--cache-root", str(tmp_path / "c"), "--preset", "tiny",
            "--agents", "dino,gpt3", "--protocol", "all", "--shots", "1,4", "--seeds", "1,2", "--views", "3",
            "--view-seed", "5", "--layers", "7,3", "--token-pool", "2", "--dtype", "int8", "--max-bytes", "1e9",
            "--batch-size", "2", "--device", "cpu", "--backend", "hdf5", "--on-error", "skip",
            "--descriptions", "gpt3=g.json", "--agent-path", "dino=w", "--log", "x.jsonl"]
    config = extract_config(args)
    task, = extraction_tasks({"b": [SimpleNamespace(spec=SimpleNamespace(name="gpt3"))]},
                             {"b": dataclasses.replace(config, dataset="b")}, tmp_path / "tasks")
    assert task.argv[:2] == ["extract", "--config"]
    absolute = {"data_root": Path("d").absolute(), "cache_root": tmp_path / "c", "log": Path("x.jsonl").absolute(),
                "descriptions": {"gpt3": str(Path("g.json").absolute())}, "agent_paths": {}}
    assert extract_config(task.argv[1:]) == dataclasses.replace(config, **absolute, dataset="b", agents="gpt3")
    assert config.layers == (3, 7) and config.token_pool == 2 and config.protocols == ("base2novel", "fewshot")
    # scheduler flags without --launcher submitit would be ignored: refused
    result = CliRunner().invoke(main, ["sweep", "--retries", "2", "--dry-run"])
    assert result.exit_code == 2 and "--retries only apply with --launcher submitit" in result.output
    result = CliRunner().invoke(main, ["sweep", "--launcher", "submitit", "--datasets", "eurosat,dtd", "--seeds",
                                       "1,2", "--runs-root", str(tmp_path / "runs"), "--force", "--dry-run"])
    assert result.exit_code == 0 and "4 cell(s), a job each through submitit" in result.output
    commands = [line.split(None, 1)[1] for line in result.output.splitlines() if "transagent distill" in line]
    assert len(commands) == 4 and all("--force" not in c for c in commands)   # cleared on this node instead
    # a cell's task is `distill --config` of its file, roots made absolute; a retry resumes it
    cell = resolve({"runs_root": Path("runs"), "report_to": "tensorboard"})
    task, = sweep_tasks([cell], tmp_path / "cells")
    first = distill_cli.make_context("distill", task.argv[1:])
    retry = distill_cli.make_context("distill", task.retry_argv[1:]).params
    config = resolve(layers(first, DistillRun).merged())
    assert task.argv[:2] == ["distill", "--config"] and config.runs_root == Path("runs").absolute()
    assert (first.params["resume"], first.params["force"], retry["resume"], config.report_to) == \
        (False, False, True, "tensorboard")
    assert task.record == run_directory(cell).absolute() / "job.json"
    kept = resolve({"runs_root": tmp_path / "runs", "seeds": (2,)})
    for options in (cell := resolve({"runs_root": tmp_path / "runs"}), kept):
        run_directory(options).mkdir(parents=True)
        (run_directory(options) / "final.json").write_text("{}")
    clear_forced([cell])
    assert not run_directory(cell).exists() and run_directory(kept).exists()
    # with --no-wait, a task waiting for another needs SLURM's dependencies
    tasks = [Task("d/vicuna", ["x"], finished=lambda: False), Task("d/sd", ["y"], lambda: False, after=("d/vicuna",))]
    options = LaunchOptions(cluster="local", wait=False)
    with pytest.raises(LaunchError, match="d/sd wait"):
        launch(tasks, make_executor(options, tmp_path / "jobs", "t"), options)
    assert not list((tmp_path / "jobs").glob("*_submitted.pkl"))   # refused before anything was submitted


def test_task_command_lines_carry_every_flag_and_the_submitting_node_checks_first(tmp_path):
    """--dataset-name, the agent's --agent-option, --strict and --wait travel in an extraction task (a retry waits
    for a dead job's lease to go stale); --mac-student and --dataset-name in a cell's task; the submitit path
    refuses what the in-process path refuses before anything is submitted."""
    from cache_schema.lock import HEARTBEAT, STALE_AFTER

    args = ["--dataset", "folder:imgs", "--dataset-name", "lab", "--cache-root", str(tmp_path / "c"), "--agents",
            "gpt3,vicuna", "--agent-option", "gpt3:template=coop", "--agent-option", "gpt3:n=5",
            "--agent-option", "gpt3:flag=true", "--agent-option", 'gpt3:word="5"', "--agent-option",
            "vicuna:descriptions=generate", "--strict", "--wait", "12.5"]
    job = SimpleNamespace(spec=SimpleNamespace(name="gpt3"))
    task, = extraction_tasks({"folder:imgs": [job]}, {"folder:imgs": extract_config(args)}, tmp_path / "tasks")
    assert task.name == "lab/gpt3"
    rebuilt = extract_config(task.argv[1:])
    assert (rebuilt.dataset, rebuilt.dataset_name, rebuilt.strict, rebuilt.wait) == ("folder:imgs", "lab", True, 12.5)
    assert rebuilt.agent_settings == {"gpt3": {"template": "coop", "n": 5, "flag": True, "word": "5"}}
    retry = extract_config(task.retry_argv[1:])
    assert retry.wait == STALE_AFTER + HEARTBEAT and dataclasses.replace(retry, wait=12.5) == rebuilt
    cell = resolve({"dataset": "folder:imgs", "dataset_name": "lab", "loss.mac_student": "logits",
                    "runs_root": tmp_path})
    task, = sweep_tasks([cell], tmp_path / "cells")
    first = resolve(layers(distill_cli.make_context("distill", task.argv[1:]), DistillRun).merged())
    assert (first.loss.mac_student, first.dataset_name) == ("logits", "lab")
    # the submitting node's checks: one --dataset-name for two datasets, a bad device, a root that is not writable
    result = CliRunner().invoke(main, ["extract", "--dataset", "a,b", "--dataset-name", "x", "--dry-run"])
    assert result.exit_code == 2 and "--dataset-name" in result.output
    from pipelines.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=2, per_class=(2, 1, 1))
    (tmp_path / "file").write_text("")
    submit = ["extract", "--launcher", "submitit", "--cluster", "local", "--dataset", "synthetic", "--preset", "tiny",
              "--agents", "dino", "--shots", "1", "--seeds", "1", "--views", "1", "--data-root", str(tmp_path / "data")]
    result = CliRunner().invoke(main, submit + ["--cache-root", str(tmp_path / "file" / "c")])
    assert result.exit_code == 1 and "--cache-root" in result.output and "not writable" in result.output
    result = CliRunner().invoke(main, submit + ["--cache-root", str(tmp_path / "c"), "--device", "gpu:x"])
    assert result.exit_code == 2 and "is not a device" in result.output
    assert not (tmp_path / "c" / ".jobs").exists()   # nothing was submitted


def test_launcher_retries_killed_tasks_orders_waiting_ones_and_records_jobs(tmp_path, job_env, caplog):
    """Real jobs (submitit's local executor), cheap bodies: a task killed once is re-submitted and finishes, a task
    waiting for it starts only after it, a failing `transagent` command is retried then reported (and the one
    waiting for it is not run), a real `transagent` command runs offline in its job."""
    from pipelines.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=2, per_class=(2, 1, 1))
    marks = tmp_path / "marks"
    marks.mkdir()
    fewshot = ["datasets", "fewshot", "synthetic", "--shots", "1", "--seeds", "3", "--data-root",
               str(tmp_path / "data")]

    def task(name, behaviour, *rest, after=()):
        argv = [str(marks), name, behaviour, *rest]
        return Task(name, argv, finished=(marks / f"{name}.done").exists, retry_argv=argv + ["--resume"],
                    after=after, record=tmp_path / "records" / f"{name}.json")

    tasks = [task("vicuna", "killed-once"), task("sd", "ok", "vicuna", after=("vicuna",)),
             task("broken", "transagent", *fewshot[:2], "no-such-dataset", *fewshot[3:]),
             task("later", "ok", after=("broken",)), task("real", "transagent", *fewshot),
             Task("old", ["-"], finished=lambda: True)]
    options = LaunchOptions(cluster="local", retries=1, gpus_per_task=0, poll_seconds=0.05)
    caplog.set_level(logging.INFO, logger="pipelines.launch")
    states = launch(tasks, make_executor(options, tmp_path / "jobs", "test"), options,
                    function=launcher_tasks.marker_task)
    lines = caplog.messages
    by_name = {state.task.name: state for state in states}
    assert {name: state.status for name, state in by_name.items()} == \
        {"vicuna": "done", "sd": "done", "broken": "failed", "later": "not run", "real": "done", "old": "exists"}
    # every attempt was a job of its own, in a process of its own, with its own log
    pids = [pid for name in ("vicuna", "sd", "broken", "real")
            for pid in (marks / f"{name}.attempts").read_text().split()]
    job_ids = [job_id for state in states for job_id in state.job_ids]
    assert len(pids) == len(set(pids)) == 6 and str(os.getpid()) not in pids
    assert len(job_ids) == len(set(job_ids)) == 6 and len(by_name["vicuna"].job_ids) == 2
    assert json.loads((marks / "sd.done").read_text()) == {"prerequisite_done": True}   # sd waited for vicuna
    assert not (marks / "later.attempts").exists()
    # the real command ran in its job, offline; the failing one left its error in its log
    assert json.loads((marks / "real.done").read_text()) == {"HF_HUB_OFFLINE": "1"}
    assert (tmp_path / "data" / "synthetic" / "fewshot" / "shot_1-seed_3.json").exists()
    assert "transagent datasets fewshot synthetic" in by_name["real"].log.read_text()
    assert "no-such-dataset" in Path(by_name["broken"].jobs[0].paths.stderr).read_text()
    record = json.loads((tmp_path / "records" / "vicuna.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 2 and record["job_ids"] == by_name["vicuna"].job_ids
    assert json.loads((tmp_path / "records" / "broken.json").read_text())["status"] == "failed"
    assert any(line.startswith("retrying  vicuna") for line in lines)
    assert any(line.startswith("FAILED    broken") and "after 2 attempts" in line for line in lines)
    assert lines[-1].endswith("6 task(s): 3 done, 1 exists, 1 failed, 1 not run")


@pytest.mark.slow
def test_submitit_sweep_equals_in_process(tmp_path, job_env):
    """Two cells, a job each (each job imports torch: about 5 s of CPU apiece, hence slow)."""
    roots = ["--data-root", str(tmp_path / "data"), "--cache-root", str(tmp_path / "cache")]
    args = ["sweep", "--preset", "tiny", "--dataset", "synthetic", "--agents", "none", "--epochs", "2", "--shots",
            "2", "--seeds", "1,2", "--device", "cpu", "--report-to", "tensorboard", *roots]
    local = CliRunner().invoke(main, args + ["--runs-root", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    submitted = CliRunner().invoke(main, args + ["--runs-root", str(tmp_path / "jobs"), "--launcher", "submitit",
                                                 "--cluster", "local", "--slurm-gpus-per-task", "0",
                                                 "--poll-seconds", "0.1"])
    assert submitted.exit_code == 0, submitted.output
    finals = sorted((tmp_path / "local").rglob("final.json"))
    assert len(finals) == 2
    listed = {row["run_dir"]: row for row in
              map(json.loads, CliRunner().invoke(main, ["runs", "ls", str(tmp_path / "jobs"), "--json"])
                  .output.splitlines())}
    job_ids = set()
    for final in finals:
        relative = final.parent.relative_to(tmp_path / "local")
        mine, theirs = json.loads(final.read_text()), json.loads((tmp_path / "jobs" / relative / "final.json")
                                                                 .read_text())
        assert theirs["accuracy"] == mine["accuracy"]                       # bit-identical accuracies
        assert (tmp_path / "jobs" / relative / "metrics.jsonl").read_text() == \
            (tmp_path / "local" / relative / "metrics.jsonl").read_text()
        record = json.loads((tmp_path / "jobs" / relative / "job.json").read_text())
        log = Path(record["log"]).read_text()                               # the job's own log, its own process
        assert "distill --config" in log and f"pid {os.getpid()} " not in log and str(relative) in log
        row = listed[relative.as_posix()]
        assert row["status"] == "done" and row["job_id"] == record["job_id"] and row["accuracy"] == mine["accuracy"]
        job_ids.add(record["job_id"])
        assert list((tmp_path / "jobs" / relative / "tensorboard").glob("events.*"))   # the flag reached the job
    assert len(job_ids) == 2 and "2 task(s): 2 done" in submitted.output


@pytest.mark.slow
def test_submitit_extraction_with_a_killed_task_retried_equals_in_process(tmp_path, job_env, monkeypatch, caplog):
    """Two agents, a job each; dino's first job is SIGKILLed mid-segment, re-submitted by --retries 1, and resumes."""
    from pipelines.datasets import make_synthetic
    from pipelines.extract_run import extract_dataset
    from pipelines.submit import submit_extraction
    from test_extract_distributed import caches

    make_synthetic(tmp_path / "data", num_classes=4, per_class=(6, 2, 3))
    args = ["extract", "--dataset", "synthetic", "--preset", "tiny", "--shots", "4", "--seeds", "1", "--views", "2",
            "--batch-size", "1", "--agents", "dino,bert", "--data-root", str(tmp_path / "data")]
    local = CliRunner().invoke(main, args + ["--cache-root", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    monkeypatch.setenv("LAUNCH_TEST_MARKERS", str(tmp_path))
    monkeypatch.setenv("LAUNCH_TEST_KILL", "dino")
    config = extract_config(args[1:] + ["--cache-root", str(tmp_path / "jobs")])
    options = LaunchOptions(cluster="local", gpus_per_task=0, retries=1, poll_seconds=0.1)
    plans = {"synthetic": extract_dataset(config, dry_run=True)}
    caplog.set_level(logging.INFO, logger="pipelines.launch")
    states = submit_extraction(plans, {"synthetic": config}, options, tmp_path / "jobs" / ".jobs",
                               function=launcher_tasks.extract_killed_once)
    lines = caplog.messages
    assert {s.task.name: (s.status, len(s.jobs)) for s in states} == \
        {"synthetic/dino": ("done", 2), "synthetic/bert": ("done", 1)}, lines
    killed = int((tmp_path / "killed-dino").read_text())
    assert killed != os.getpid() and any(line.startswith("retrying  synthetic/dino") for line in lines)
    expected, actual = caches(tmp_path / "local"), caches(tmp_path / "jobs")
    assert sorted(expected) == sorted(actual) and [name.split("/")[0] for name in sorted(actual)] == ["bert", "dino"]
    log = [json.loads(line) for line in (tmp_path / "jobs" / "synthetic" / "extract.jsonl").read_text().splitlines()]
    assert {entry["agent"]: len(entry["job_ids"]) for entry in log if entry.get("event") == "submitit"} == \
        {"dino": 2, "bert": 1}
    _assert_same(expected, actual)


def _assert_same(expected, actual):
    from cache_schema import CacheReader, verify

    for name, path in expected.items():
        assert verify(actual[name]) == [], name
        want, got = CacheReader(path), CacheReader(actual[name])
        for array in want.arrays:
            np.testing.assert_array_equal(got.read(array, want.rows), want.read(array, want.rows), err_msg=name)
        assert (actual[name] / "rows.json").read_bytes() == (path / "rows.json").read_bytes(), name

"""Lab-scale tools without a scheduler: TensorBoard records, `--report-to` errors, pushing a cache root with
filters, `cache ls --json`, `runs ls [--json]` on good and hostile run directories, progress callbacks, --quiet."""
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines import progress
from pipelines.cli import main
from pipelines.commands.cache import cache as cache_cli
from pipelines.runs import list_runs, table
from pipelines.share import RemoteError, push_root, read_index
from pipelines.tracking import TrackingError, parse_report_to, scalars
from cache_schema import AgentCache
from test_cache_share import ARRAYS, FIELDS, keys_rows, write_cache


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    found = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return found, events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_tensorboard_holds_the_metrics_records_across_a_resume(tmp_path):
    from pipelines.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=4, per_class=(2, 1, 1))
    args = ["distill", "--preset", "tiny", "--dataset", "synthetic", "--agents", "none", "--shots", "2", "--epochs",
            "2", "--device", "cpu", "--data-root", str(tmp_path / "data"), "--cache-root", str(tmp_path / "cache"),
            "--runs-root", str(tmp_path / "runs"), "--report-to", "tensorboard"]
    stopped = CliRunner().invoke(main, args + ["--stop-after-epoch", "1"])
    assert stopped.exit_code == 0 and "stopped after epoch 1" in stopped.output, stopped.output
    resumed = CliRunner().invoke(main, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    run_dir, = (path.parent for path in (tmp_path / "runs").rglob("final.json"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found, config = _events(run_dir / "tensorboard")
    per_epoch = len(records) // 2
    steps = [(r["epoch"] - 1) * per_epoch + r["step"] for r in records]
    assert sorted({r["epoch"] for r in records}) == [1, 2] and steps == list(range(len(records)))
    for tag, key in (("loss/total", "total"), ("loss/ce", "ce"), ("train/lr", "lr")):   # float32 in the events
        assert found[tag] == [(step, np.float32(r[key])) for step, r in zip(steps, records, strict=True)], tag
    assert {tag for tag in found if not tag.startswith("accuracy/")} == {"loss/total", "loss/ce", "train/lr"}
    accuracy = json.loads((run_dir / "final.json").read_text())["accuracy"]
    assert {tag: values for tag, values in found.items() if tag.startswith("accuracy/")} == \
        {f"accuracy/{name}": [(steps[-1], np.float32(value))] for name, value in accuracy.items()}
    assert json.loads(config.split("```json\n")[1].split("```")[0]) == json.loads((run_dir / "config.json").read_text())
    # gate weights keep their names; an unknown or missing tracker is a clear error
    assert scalars({"epoch": 1, "step": 0, "lr": 0.1, "mac": 0.5, "gate/vision/dino": 0.25}) == \
        {"train/lr": 0.1, "loss/mac": 0.5, "gate/vision/dino": 0.25}
    assert parse_report_to("TensorBoard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_report_to("none") == ()
    with pytest.raises(TrackingError, match="mlflow"):
        parse_report_to("tensorboard,mlflow")
    result = CliRunner().invoke(main, ["distill", "--report-to", "mlflow"])
    assert result.exit_code == 2 and "unknown tracker(s) mlflow" in result.output


def test_wandb_missing_is_named(tmp_path, monkeypatch):
    from pipelines.tracking import open_trackers

    monkeypatch.setitem(sys.modules, "wandb", None)   # not installed
    trackers = open_trackers("wandb", tmp_path, "run")
    with pytest.raises(TrackingError, match=r"transagent-cache\[tracking\]"):
        trackers.config({})


def test_push_a_cache_root_with_filters_and_ls_json(tmp_path):
    root, remote = tmp_path / "cache", tmp_path / "remote"
    first = write_cache(root, keys_rows(range(3)))
    other = write_cache(root, keys_rows(range(2)), fields={**FIELDS, "agent": {"name": "toy", "layers": [1]}})
    partial = {**FIELDS, "agent": {"name": "toy", "layers": [2]}}
    AgentCache.open(root, "toyset", "toy", partial, ARRAYS)   # a partial cache: skipped, never packed
    url = remote.as_uri()
    result = CliRunner().invoke(cache_cli, ["push", str(root), url, "--fingerprint", first.name])
    assert result.exit_code == 0, result.output
    assert [entry["fingerprint"] for entry in read_index(url)] == [first.name]
    result = CliRunner().invoke(cache_cli, ["push", str(root), url, "--dataset", "toyset", "--agent", "toy"])
    assert result.exit_code == 0, result.output
    statuses = sorted(line.split()[0] for line in result.output.splitlines())
    assert statuses == ["present", "pushed", "skipped"]
    assert sorted(entry["fingerprint"] for entry in read_index(url)) == sorted([first.name, other.name])
    with pytest.raises(RemoteError, match="matches dataset=nope; it holds: toyset/toy/"):
        push_root(root, url, dataset="nope")
    result = CliRunner().invoke(cache_cli, ["push", str(first), url, "--agent", "toy"])
    assert result.exit_code == 1 and "is one cache" in result.output
    result = CliRunner().invoke(cache_cli, ["push", str(first), url])     # one cache directory, as before
    assert result.exit_code == 0 and result.output.startswith("present   toyset/toy/")

    listed = [json.loads(line) for line in
              CliRunner().invoke(cache_cli, ["ls", "--cache-root", str(root), "--json"]).output.splitlines()]
    assert {(row["fingerprint"], row["status"], row["rows"]) for row in listed if row["status"] == "complete"} == \
        {(first.name, "complete", 6), (other.name, "complete", 4)}
    assert sorted(row["status"] for row in listed) == ["complete", "complete", "partial"]
    assert all(isinstance(row["bytes"], int) and row["path"].startswith(str(root)) for row in listed)


def test_runs_ls_reads_every_state_and_survives_hostile_files(tmp_path):
    runs = tmp_path / "runs"

    def run(name, **files):
        directory = runs / "eurosat" / "base2novel" / "shots16" / f"seed{name}" / "default"
        directory.mkdir(parents=True)
        for file, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content)
            (directory / file.replace("_", ".")).write_text(text)
        return directory

    run("1", final_json={"dataset": "eurosat", "protocol": "base2novel", "shots": 16, "seed": 1, "ablation": "default",
                         "epochs": 20, "accuracy": {"base": 80.0, "novel": 70.0, "hm": 74.67}},
        job_json={"job_id": "77_0", "job_ids": ["77_0"], "status": "done"})
    run("2", config_json={"run": {"epochs": 20}}, metrics_jsonl='{"epoch": 1, "step": 0}\n{"epoch": 3, "step": 0}\nx\n')
    run("3", job_json={"job_id": "78_1", "job_ids": ["78_1"], "status": "submitted"})
    run("4", job_json={"job_id": "79", "job_ids": ["79"], "status": "failed"})
    run("5", final_json="[1, 2")                                 # truncated
    run("6", final_json={"accuracy": {"base": "80"}})             # not numbers
    (runs / "sweep-logs" / "jobs").mkdir(parents=True)           # no run files: not a run
    rows = {row["seed"]: row for row in list_runs(runs)}
    assert {seed: row["status"] for seed, row in rows.items()} == \
        {1: "done", 2: "partial", 3: "submitted", 4: "failed", 5: "unreadable", 6: "unreadable"}
    assert rows[1]["accuracy"] == {"base": 80.0, "novel": 70.0, "hm": 74.67} and rows[1]["job_id"] == "77_0"
    assert (rows[2]["epoch"], rows[2]["epochs"]) == (3, 20) and rows[3]["job_id"] == "78_1"
    assert "final.json" in rows[5]["problem"] and "accuracy" in rows[6]["problem"]
    text = table(list(rows.values()))
    assert "base 80.00 novel 70.00 hm 74.67" in text and "3/20" in text and "unreadable eurosat/" in text
    result = CliRunner().invoke(main, ["runs", "ls", str(runs), "--json"])
    assert result.exit_code == 0 and [json.loads(line)["seed"] for line in result.output.splitlines()] == \
        [1, 2, 3, 4, 5, 6]
    result = CliRunner().invoke(main, ["runs", "ls", str(tmp_path / "none")])
    assert result.exit_code == 1 and "does not exist" in result.output


class Recorder:
    """fsspec's callback interface, recorded."""

    def __init__(self):
        self.size, self.value = None, 0

    def set_size(self, size):
        self.size = size

    def relative_update(self, n=1):
        self.value += n


def test_progress_callbacks_count_the_work_and_quiet_turns_bars_off(tmp_path, monkeypatch):
    from cache_schema.merge import merge
    from cache_schema.pack import pack_cache

    cache = write_cache(tmp_path / "a", keys_rows(range(4)))
    packed = Recorder()
    info = pack_cache(cache, tmp_path / "a.tar", callback=packed)
    assert packed.size == packed.value > 0 and packed.value < info.bytes   # file bytes, without tar headers
    other = write_cache(tmp_path / "b", keys_rows(range(2, 6)))
    merged = Recorder()
    merge(other, cache, callback=merged)
    assert merged.size == merged.value == 8                               # 4 images x 2 views compared or copied
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress.set_quiet(False)
    assert progress.enabled() and type(progress.callback("x")).__name__ == "TqdmCallback"
    CliRunner().invoke(main, ["--quiet", "runs", "ls", str(tmp_path)])
    try:
        assert not progress.enabled() and type(progress.callback("x")).__name__ == "NoOpCallback"
    finally:
        progress.set_quiet(False)

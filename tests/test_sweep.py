"""`transagent sweep`: grid parsing and expansion, a cell's configuration file, the process pool, a real sweep."""
import json
import logging
import re
import sys
import time

import pytest
from click.testing import CliRunner

from pipelines.commands.distill import distill as distill_cli
from pipelines.commands.sweep import sweep as sweep_cli
from pipelines.config.cli import layers
from pipelines.config.distill import DistillRun, resolve, run_name
from pipelines.distillation import run_directory
from pipelines.sweep import (DEFAULT, SweepError, distill_command, expand_grid, load_grid, parse_ablation,
                             run_processes, summary_table, write_cell)


def cell(**values) -> DistillRun:
    """A one-cell configuration of dotted keys over the defaults."""
    return resolve(values)


def test_parse_ablation_converts_and_checks():
    """Ablations are written with configuration keys or the flags' names; 'default' unsets a key for the cell."""
    assert parse_ablation("agents=dino,mae;lambda_vac=0.5") == {"agents": "dino,mae", "loss.vac": 0.5}
    assert parse_ablation("lambda-mac=0; router=noisy-linear;") == {"loss.mac": 0.0, "gates.router": "noisy-linear"}
    assert parse_ablation("epochs=3;views=none;optim.lr=0.01") == {"optim.epochs": 3, "views": None, "optim.lr": 0.01}
    assert parse_ablation("agents=default;lambda_lac=default;views=default") == \
        {"agents": DEFAULT, "loss.lac": DEFAULT, "views": DEFAULT}
    cells = expand_grid({"ablations": ["agents=none;epochs=7", "agents=default;epochs=default"], "agents": "dino",
                         "protocol": "fewshot"})
    assert [(c.agents, c.optim.epochs) for c in cells] == [("none", 7), ("all", 50)]   # the protocol's epochs
    for bad, message in (("device=cuda", "cannot vary per cell"), ("lambda_vac=abc", "expected a number"),
                         ("agents", "NAME=VALUE"), ("router=linear", "not one of"), ("epochs=1.5", "expected an int"),
                         ("lambda_vac=", "expected a number"), ("seeds=2", "cannot vary per cell")):
        with pytest.raises(SweepError, match=message):
            parse_ablation(bad)


def test_expand_grid_enumerates_every_cell_once(tmp_path):
    cells = expand_grid({"datasets": "eurosat,dtd", "shots": "1,16", "seeds": [1, 2, 3],
                         "ablations": [{}, "agents=none", "lambda_vac=1.0", {"lambda_vac": 0.5, "epochs": 2}],
                         "protocol": "fewshot", "preset": "tiny", "runs_root": str(tmp_path), "epochs": 4})
    # "lambda_vac=1.0" is the default: the same run directories as {} -> kept once
    assert len(cells) == 2 * 2 * 3 * 3
    assert len({run_directory(c) for c in cells}) == len(cells)
    assert [(c.dataset, c.shot, c.seed) for c in cells[:4]] == [("eurosat", 1, 1)] * 3 + [("eurosat", 1, 2)]
    assert [c.agents for c in cells[:3]] == ["all", "none", "all"]
    assert cells[2].loss.vac == 0.5 and cells[2].optim.epochs == 2 and cells[0].optim.epochs == 4   # over common
    assert all(c.protocol == "fewshot" and c.preset == "tiny" and c.runs_root == tmp_path for c in cells)
    with pytest.raises(SweepError, match="at least one"):
        expand_grid({"seeds": []})
    with pytest.raises(SweepError, match="protocol"):
        expand_grid({"protocol": "all"})


def test_grid_file(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"datasets": ["eurosat"], "shots": [16], "seeds": [1, 2],
                                "ablations": [{}, {"agents": "dino,mae"}], "lambda_lac": 10, "views": 2}))
    cells = expand_grid(load_grid(path))
    assert len(cells) == 4 and all(c.loss.lac == 10.0 and c.views == 2 for c in cells)
    path.write_text("datasets: [eurosat]\noptim: {epochs: 3}\nablations: ['lambda_vac=0', {loss: {mac: 0}}]\n")
    cells = expand_grid(load_grid(path))    # YAML, sections, and ablations in either form
    assert [(c.optim.epochs, c.loss.vac, c.loss.mac) for c in cells] == [(3, 0.0, 1.0), (3, 1.0, 0.0)]
    path.write_text(json.dumps({"datasets": ["eurosat"], "epochz": 3}))
    with pytest.raises(SweepError, match="epochz"):
        load_grid(path)
    path.write_text("[1, 2")
    with pytest.raises(SweepError, match="cannot read grid file"):
        load_grid(path)


def test_a_cell_file_runs_the_same_cell(tmp_path):
    """A cell's configuration file, read back by the real `distill` command, is the cell: every setting, the same
    run directory."""
    options = cell(**{"dataset": "dtd", "data_root": tmp_path / "d", "cache_root": tmp_path / "c",
                      "runs_root": tmp_path / "r", "preset": "tiny", "agents": "dino,mae", "protocol": "fewshot",
                      "shots": (4,), "seeds": (3,), "loss.vac": 0.1, "loss.lac": 2.5e-7, "loss.rel": 0.0,
                      "loss.mac": 3.0, "loss.temperature": 0.7, "loss.mac_student": "logits",
                      "gates.router": "noisy-linear", "gates.hidden": 8, "views": 2, "layers": (3, 7, 11),
                      "optim.epochs": 5, "optim.lr": 0.01, "prompts.depth_vision": 1, "prompts.n_ctx_vision": 2,
                      "device": "cpu", "precision": "fp32", "workers": 2, "eval_initial": True,
                      "pins": {"dino": "abc", "mae": "def"}, "report_to": "tensorboard"})
    command = distill_command(write_cell(options, tmp_path / "cells"), resume=True, python="python")
    assert command[:5] == ["python", "-m", "pipelines", "distill", "--config"] and command[-1] == "--resume"
    context = distill_cli.make_context("distill", command[4:])
    rebuilt = resolve(layers(context, DistillRun).merged())
    assert rebuilt == options and run_directory(rebuilt) == run_directory(options)
    assert run_name(cell(**{"loss.mac_student": "logits"})).startswith("mac_student-logits-")
    assert parse_ablation("mac_student=logits") == {"loss.mac_student": "logits"}
    with pytest.raises(SweepError, match="loss.mac_student: 'raw' is not one of standardized, logits"):
        parse_ablation("mac_student=raw")


def test_dry_run_lists_cells_and_commands(tmp_path):
    runs = tmp_path / "runs"
    finished = cell(dataset="b", shots=(2,), seeds=(1,), agents="none", **{"runs_root": runs})
    run_directory(finished).mkdir(parents=True)
    (run_directory(finished) / "final.json").write_text("{}")
    args = ["--datasets", "a,b", "--shots", "1,2", "--seeds", "1,2", "--ablation", "agents=none",
            "--ablation", "lambda_vac=0.5;lambda_mac=0", "--runs-root", str(runs), "--dry-run"]
    result = CliRunner().invoke(sweep_cli, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if re.match(r"\s*\d+\. ", line)]
    assert len(lines) == 16 and "16 cell(s), in-process" in result.output
    assert lines[0].endswith("a/base2novel/shots1/seed1/" + run_name(cell(agents="none", shots=(1,))))
    assert sum("(finished)" in line for line in lines) == 1
    result = CliRunner().invoke(sweep_cli, args + ["--processes", "2"])   # each cell as its --set list
    assert result.output.count("--set dataset=") == 16 and "--set loss.mac=0.0" in result.output
    result = CliRunner().invoke(sweep_cli, ["--mac-student", "logits", "--runs-root", str(runs), "--processes", "1",
                                            "--dry-run"])
    assert result.exit_code == 0 and "mac_student-logits-" in result.output
    assert "--set loss.mac_student=logits" in result.output


def test_grid_file_values_yield_to_explicit_flags(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"datasets": ["eurosat", "dtd"], "seeds": [1, 2, 3], "epochs": 7}))
    result = CliRunner().invoke(sweep_cli, ["--grid", str(grid), "--seeds", "5", "--runs-root", str(tmp_path),
                                            "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 cell(s)" in result.output and "seed5" in result.output and "epochs-7" in result.output
    result = CliRunner().invoke(sweep_cli, ["--ablation", "device=cpu", "--dry-run"])
    assert result.exit_code == 1 and "cannot vary per cell" in result.output
    result = CliRunner().invoke(sweep_cli, ["--ablation", "bogus=1", "--dry-run"])
    assert result.exit_code == 1 and "unknown configuration key 'bogus'" in result.output


FAKE_DISTILL = """
import json, os, sys, time
from pathlib import Path
directory, seed, marks = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
(marks / f"start-{seed}").write_text(str(time.time()))
time.sleep(0.3)
(marks / f"end-{seed}").write_text(str(time.time()))
print("training", seed)
if seed == 2:
    sys.exit("RuntimeError: cell 2 broke")
directory.mkdir(parents=True, exist_ok=True)
(directory / "final.json").write_text(json.dumps(
    {"accuracy": {"all": 50.0 + seed}, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""


def test_process_pool_limits_concurrency_keeps_going_and_logs(tmp_path, caplog):
    marks = tmp_path / "marks"
    marks.mkdir()
    cells = expand_grid({"datasets": "eurosat", "seeds": [1, 2, 3, 4, 5], "runs_root": str(tmp_path / "runs")})
    caplog.set_level(logging.INFO, logger="pipelines.sweep")
    done_before = cells[4]
    run_directory(done_before).mkdir(parents=True)
    (run_directory(done_before) / "final.json").write_text(json.dumps({"accuracy": {"all": 1.0}}))
    script = tmp_path / "fake_distill.py"
    script.write_text(FAKE_DISTILL)

    def command(cell):
        return [sys.executable, str(script), str(run_directory(cell)), str(cell.seed), str(marks)]

    results = run_processes(cells, 2, tmp_path / "logs", gpus=("0", "1"), command=command, poll_seconds=0.02)
    assert [r.status for r in results] == ["done", "failed", "done", "done", "exists"]
    assert results[0].accuracy == {"all": 51.0} and results[4].accuracy == {"all": 1.0}
    assert "cell 2 broke" in results[1].error and results[1].error.startswith("exit 1")
    assert "training 2" in results[1].log.read_text()
    assert {json.loads((run_directory(c) / "final.json").read_text())["gpu"] for c in cells[:4:2]} <= {"0", "1"}
    intervals = [(float((marks / f"start-{s}").read_text()), float((marks / f"end-{s}").read_text()))
                 for s in (1, 2, 3, 4)]
    for start, _ in intervals:   # never more than 2 running at any start
        assert sum(s <= start < e for s, e in intervals) <= 2
    assert sum(1 for m in caplog.messages if "started" in m) == 4
    table = summary_table(results)
    assert "failed" in table and "all 53.00" in table and "exists" in table


def test_real_tiny_sweep_in_process(tmp_path):
    """Two seeds train for real (synthetic data, no agents); a cell whose caches are missing fails alone."""
    roots = ["--data-root", str(tmp_path / "data"), "--cache-root", str(tmp_path / "cache"),
             "--runs-root", str(tmp_path / "runs")]
    args = ["--preset", "tiny", "--dataset", "synthetic", "--agents", "none", "--epochs", "1", "--shots", "2",
            "--seeds", "1,2", "--device", "cpu", *roots]
    start = time.perf_counter()
    result = CliRunner().invoke(sweep_cli, args + ["--ablation", "agents=none", "--ablation", "agents=dino"])
    assert result.exit_code == 1, result.output
    assert "2 of 4 cell(s) failed" in result.output and "agents-dino" in result.output
    finals = sorted((tmp_path / "runs").rglob("final.json"))
    assert len(finals) == 2 and all("agents-none" in str(p) for p in finals)
    accuracy = json.loads(finals[0].read_text())["accuracy"]
    assert set(accuracy) == {"base", "novel", "hm"}
    assert len(list((tmp_path / "runs" / "sweep-logs").glob("*agents-dino*.log"))) == 2   # their tracebacks
    again = CliRunner().invoke(sweep_cli, args)
    assert again.exit_code == 0 and again.output.count("finished before, skipped") == 2
    assert time.perf_counter() - start < 60

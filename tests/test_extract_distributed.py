"""Stage 1 under torchrun (2 CPU processes, gloo): the same caches as one process; a rank killed mid-way is recovered
by a plain one-process re-run; and the segment plan gives every rank disjoint work by construction.

As in test_extract_e2e: --batch-size 1 and one torch thread everywhere, so the comparisons are exact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from cache_schema import AgentCache, ArraySpec, CacheReader, verify
from pipelines.cli import main

AGENTS = "dino,sd,bert"
OPTIONS = ("--dataset", "synthetic", "--preset", "tiny", "--shots", "4", "--seeds", "1", "--views", "2",
           "--batch-size", "1", "--agents", AGENTS)


def extract_args(data_root, cache_root):
    return ["extract", *OPTIONS, "--data-root", str(data_root), "--cache-root", str(cache_root)]


def torchrun(data_root, cache_root) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pipelines", *extract_args(data_root, cache_root)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def stop_group(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def caches(cache_root):
    return {f"{p.parent.parent.name}/{p.parent.name}": p.parent
            for p in sorted(cache_root.glob("*/*/*/manifest.json"))}


def assert_same_caches(expected_root, actual_root):
    expected, actual = caches(expected_root), caches(actual_root)
    assert sorted(actual) == sorted(expected) and len(expected) == 3
    for name, path in expected.items():
        assert verify(actual[name]) == [], name
        want, got = CacheReader(path), CacheReader(actual[name])
        assert set(got.rows) == set(want.rows), name
        for array in want.arrays:
            np.testing.assert_array_equal(got.read(array, want.rows), want.read(array, want.rows),
                                          err_msg=f"{name} {array}")
        # rows are sorted, and each rank's segment is a contiguous slice of them: the row table is the same too
        assert (actual[name] / "rows.json").read_bytes() == (path / "rows.json").read_bytes(), name


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from pipelines.datasets import make_synthetic

    root = tmp_path_factory.mktemp("distributed")
    make_synthetic(root / "data", num_classes=4, per_class=(6, 2, 3))
    result = CliRunner().invoke(main, extract_args(root / "data", root / "cache"))
    assert result.exit_code == 0, result.output
    return root


def test_two_ranks_write_the_same_caches_as_one_process(one_process, tmp_path):
    process = torchrun(one_process / "data", tmp_path / "cache")
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        stop_group(process)
    assert process.returncode == 0, output
    for name, path in caches(tmp_path / "cache").items():
        segments = sorted(p.name for p in (path / "segments").glob("*.rows.json"))
        assert segments == ["seg-00000.rows.json", "seg-00001.rows.json"], name   # one per rank
    log = [json.loads(line) for line in (tmp_path / "cache" / "synthetic" / "extract.jsonl").read_text().splitlines()]
    assert sorted((entry["rank"], entry["agent"]) for entry in log) == sorted(
        (rank, agent) for rank in (0, 1) for agent in AGENTS.split(","))
    assert_same_caches(one_process / "cache", tmp_path / "cache")


def _rank_one_midway(cache_root) -> bool:
    """A segment of rank 1 (seg-00001 on a fresh cache) has some but not all of its rows journaled."""
    for journal in cache_root.glob("synthetic/*/*/segments/seg-00001.done.jsonl"):
        try:
            rows = len(json.loads(journal.with_name("seg-00001.rows.json").read_text()))
            written = journal.read_text().count("\n")
        except (OSError, ValueError):
            continue
        if 0 < written < rows:
            return True
    return False


def _worker(process, rank: int):
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_is_recovered_by_a_one_process_rerun(one_process, tmp_path):
    cache_root = tmp_path / "cache"
    process = torchrun(one_process / "data", cache_root)
    killed = False
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline and not killed:
            if _rank_one_midway(cache_root) and (worker := _worker(process, 1)) is not None:
                worker.send_signal(signal.SIGSTOP)   # freeze it, then confirm the state it is killed in
                if _rank_one_midway(cache_root):
                    worker.send_signal(signal.SIGKILL)
                    killed = True
                else:
                    worker.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        output, _ = process.communicate(timeout=120)   # torchrun stops rank 0 when rank 1 dies
    finally:
        stop_group(process)
    assert killed, f"rank 1 finished before it could be killed mid-way:\n{output}"
    assert process.returncode != 0
    states = {name: json.loads((path / "manifest.json").read_text())["status"]
              for name, path in caches(cache_root).items()}
    assert "partial" in states.values(), states

    rerun = CliRunner().invoke(main, extract_args(one_process / "data", cache_root))
    assert rerun.exit_code == 0, rerun.output
    assert_same_caches(one_process / "cache", cache_root)


# ---- the plan: disjoint and complete by construction ------------------------------------------------------------

ARRAYS = {"x": ArraySpec((2,), "float32")}
NEEDED = [(f"class_{i % 3}/{i:04d}.png", view) for i in range(9) for view in range(2)]   # 18 rows


def _planned_rows(cache, plan):
    """(rank, key, view) for every row the plan gives out, via the segments' row tables."""
    cache.create_segments()
    tables = {segment.name: segment.rows for segment in cache.segments()}
    return [(rank, *tables[name][local]) for rank, work in plan.items() for name, rows in work for local in rows]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_plan_gives_each_row_to_exactly_one_rank(tmp_path, world_size):
    # A killed 2-rank run: 12 of the 18 rows were planned, part of them written.
    first = AgentCache.open(tmp_path / "cache", "synthetic", "agent", {"f": 1}, ARRAYS)
    first.plan(NEEDED[:12], world_size=2)
    first.create_segments()
    for name, done in (("seg-00000", [0, 1, 2]), ("seg-00001", [0, 1, 2, 3, 4])):
        with first.segment_writer(name) as writer:
            writer.write(done, {"x": np.ones((len(done), 2), np.float32)})
    done = first.done_rows()
    assert len(done) == 8

    # Every rank plans from the same disk state and gets the same answer.
    plans = [AgentCache.open(tmp_path / "cache", "synthetic", "agent", {"f": 1}, ARRAYS).plan(NEEDED, world_size)
             for _ in range(world_size)]
    assert all(plan == plans[0] for plan in plans)
    cache = AgentCache.open(tmp_path / "cache", "synthetic", "agent", {"f": 1}, ARRAYS)
    plan = cache.plan(NEEDED, world_size)
    assert sorted(plan) == list(range(world_size))
    given = _planned_rows(cache, plan)
    rows = [(key, view) for _, key, view in given]
    assert len(rows) == len(set(rows))                      # disjoint: no row twice, so no two writers of a row
    assert set(rows) == set(NEEDED) - done                  # complete: every missing row, nothing done again
    segments_of = {}
    for rank, work in plan.items():
        for name, _ in work:
            segments_of.setdefault(name, set()).add(rank)
    assert all(len(ranks) == 1 for ranks in segments_of.values())   # one writer per segment file
    new = [name for name in segments_of if name not in ("seg-00000", "seg-00001")]
    assert len(new) == min(world_size, len(NEEDED) - 12)    # the 6 new rows: one new segment per rank


def test_plan_on_a_fresh_cache_splits_rows_into_one_segment_per_rank(tmp_path):
    for world_size in (1, 2, 3):
        root = tmp_path / f"world{world_size}"
        cache = AgentCache.open(root, "synthetic", "agent", {"f": 1}, ARRAYS)
        plan = cache.plan(NEEDED, world_size)
        given = _planned_rows(cache, plan)
        assert sorted((key, view) for _, key, view in given) == sorted(NEEDED)
        assert all(len(work) == 1 for work in plan.values())
        # rank r holds the r-th contiguous slice of the sorted rows, so the row table does not depend on world size
        assert [(key, view) for _, key, view in sorted(given)] == sorted(NEEDED)
        shutil.rmtree(root)

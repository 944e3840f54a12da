"""Attacks on "one writer per cache": a `gc --apply` between an extraction's last journaled row and `complete`, two
writers that plan the same segment, a second writer while one holds the lock, a lease left by a dead process or a
dead node, and a lease only `cache unlock --force` can clear. Every interleaving is driven through hook points
(monkeypatched methods, the lock's `on_wait` callback), never by sleeping for a race."""
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_schema import AgentCache, ArraySpec, CacheError, CacheReader, cache_dir, verify
from cache_schema.gc import remove_cache
from cache_schema.install import install_pack
from cache_schema.lock import (LEASE, LOCK, STALE_AFTER, WRITER, WriterLock, WriterLocked, WriterLockLost,
                               current_holder, writer_lock)
from cache_schema.merge import merge
from cache_schema.pack import pack_cache
from pipelines.cache_hints import hint
from pipelines.cli import main

BACKENDS = ["zarr", "hdf5"]
ARRAYS = {"x": ArraySpec((3,), "float32"), "tag": ArraySpec((2,), "int32")}
FIELDS = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}
DEAD_PID = 2147483646     # above any pid_max: no such process


def rows_of(keys, views=2):
    return [(f"class_{k % 2}/img_{k}.png", v) for k in keys for v in range(views)]


def row_value(row):
    """Content derived from the row itself, so a row stored under another row's key is visible."""
    key, view = row
    number = int(key.rsplit("_", 1)[1].split(".")[0])
    return {"x": np.array([number, view, number * 10 + view], np.float32), "tag": np.array([number, view], np.int32)}


def open_cache(root, backend):
    return AgentCache.open(root, "toyset", "toy", FIELDS, ARRAYS, backend=backend)


def fill(cache, rows):
    """One writer, start to finish: plan, create, write, complete."""
    plan = cache.plan(rows)
    cache.create_segments()
    write_planned(cache, plan[0])
    cache.finalize()
    return cache.path


def write_planned(cache, work):
    for name, local in work:
        with cache.segment_writer(name) as writer:
            values = [row_value(writer.rows[i]) for i in local]
            writer.write(local, {k: np.stack([v[k] for v in values]) for k in ARRAYS})


def assert_every_row_is_its_own(path, rows):
    reader = CacheReader(path)
    assert sorted(reader.rows) == sorted(rows)
    for name in ARRAYS:
        np.testing.assert_array_equal(reader.read(name, rows), np.stack([row_value(row)[name] for row in rows]))
    assert verify(path) == []


def write_lease(path, pid, host, age=0.0, text=None):
    """A lease as another process would have left it, `age` seconds after its last heartbeat."""
    lease = Path(path) / WRITER / LEASE
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(text if text is not None else json.dumps(
        {"pid": pid, "host": host, "since": "2026-11-30T08:00:00+00:00", "purpose": "extract dino", "token": "t0"}))
    stamp = time.time() - age
    os.utime(lease, (stamp, stamp))
    return lease


# ---- item 1: gc between the last journaled row and `complete` --------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pipelines.datasets import make_synthetic

    root = tmp_path_factory.mktemp("lockdata")
    make_synthetic(root, num_classes=2, per_class=(2, 1, 1))
    return root


def extract_args(data_root, cache_root, backend="zarr", *extra, agents="dino"):
    return ["extract", "--dataset", "synthetic", "--preset", "tiny", "--shots", "2", "--seeds", "1", "--views", "2",
            "--batch-size", "2", "--agents", agents, "--backend", backend, "--data-root", str(data_root),
            "--cache-root", str(cache_root), *extra]


def planned_dino_path(data_root, cache_root):
    from extract.runner import planned_path
    from pipelines.extraction import ExtractOptions, build_jobs

    options = ExtractOptions(dataset="synthetic", data_root=data_root, cache_root=cache_root, preset="tiny",
                             agents="dino", shots=(2,), seeds=(1,), views=2, batch_size=2)
    (job,) = build_jobs(options)
    return planned_path(job, cache_root)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", ["create_segments", "finalize"])
def test_gc_apply_during_an_extraction_deletes_nothing(data_root, tmp_path, monkeypatch, backend, hook):
    """The extraction is stopped right after planning (before its segments exist) or right after its last row is
    journaled (before `complete`), `cache gc --apply` runs, then the extraction resumes and must finish."""
    cache_root, runs_root = tmp_path / "cache", tmp_path / "runs"
    original = getattr(AgentCache, hook)
    collected = []

    def gc_then_resume(self, *args, **kwargs):
        if hook == "finalize":
            assert all(len(s.done) == len(s.rows) for s in self.segments())   # every row journaled
        collected.append(CliRunner().invoke(main, ["cache", "gc", "--apply", "--cache-root", str(cache_root),
                                                   "--runs-root", str(runs_root)]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AgentCache, hook, gc_then_resume)
    result = CliRunner().invoke(main, extract_args(data_root, cache_root, backend))
    assert result.exit_code == 0, result.output
    (gc,) = collected
    assert gc.exit_code == 0, gc.output
    assert "locked" in gc.output and "deleted" not in gc.output, gc.output
    assert f"pid {os.getpid()}" in gc.output
    (manifest,) = cache_root.glob("synthetic/dino/*/manifest.json")
    assert json.loads(manifest.read_text())["status"] == "complete"
    assert verify(manifest.parent) == [] and CacheReader(manifest.parent).manifest.rows == 4
    assert current_holder(manifest.parent) is None and not (manifest.parent / WRITER / LEASE).exists()


def test_an_extraction_whose_lock_was_forced_open_does_not_complete(data_root, tmp_path):
    """Someone ran `cache unlock --force` (or took a silent writer's lease over) while the extraction computed:
    it must stop before `complete` instead of finishing a cache another writer may be changing."""
    from extract.runner import run_agent
    from pipelines.extraction import ExtractOptions, build_jobs

    options = ExtractOptions(dataset="synthetic", data_root=data_root, cache_root=tmp_path, preset="tiny",
                             agents="dino", shots=(2,), seeds=(1,), views=2, batch_size=2)
    (job,) = build_jobs(options)
    barriers = []

    def barrier():   # the 4th barrier is the last one before `complete`
        barriers.append(1)
        if len(barriers) == 4:
            next(tmp_path.glob(f"synthetic/dino/*/{WRITER}/{LEASE}")).unlink()

    with pytest.raises(WriterLockLost, match="removed"):
        run_agent(job, tmp_path, barrier=barrier, progress=False)
    (manifest,) = tmp_path.glob("synthetic/dino/*/manifest.json")
    assert json.loads(manifest.read_text())["status"] == "partial"


def test_gc_rechecks_the_status_under_the_lock(tmp_path):
    """A cache listed as partial that has become complete by the time gc removes it is kept."""
    cache = open_cache(tmp_path / "cache", "zarr")
    fill(cache, rows_of([0]))
    assert remove_cache(cache.path, tmp_path / "cache", status="partial") is False
    assert verify(cache.path) == []
    with WriterLock(cache.path, purpose="extract toy"):
        with pytest.raises(WriterLocked, match=f"pid {os.getpid()}"):
            remove_cache(cache.path, tmp_path / "cache", status="complete")
    assert remove_cache(cache.path, tmp_path / "cache", status="complete") is True
    assert not cache.path.exists()


# ---- item 2: two writers on one cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_plans_of_one_segment_never_overwrite_it(tmp_path, backend):
    """Two writers plan before either creates its segment (both call it seg-00000): the second is refused when it
    creates, and no row holds another row's data."""
    root = tmp_path / "cache"
    first, second = open_cache(root, backend), open_cache(root, backend)
    plan_first, plan_second = first.plan(rows_of(range(0, 10))), second.plan(rows_of(range(5, 15)))
    assert plan_first[0][0][0] == plan_second[0][0][0] == "seg-00000"
    first.create_segments()
    write_planned(first, plan_first[0][:1])
    with pytest.raises(CacheError, match="seg-00000.*another writer"):
        second.create_segments()
    first.finalize()
    assert_every_row_is_its_own(first.path, rows_of(range(0, 10)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_writer_is_refused_naming_the_holder_or_waits_for_it(tmp_path, backend):
    """The race through the library API: writer A holds the lock and has planned; writer B is refused at once
    with A's host, pid and start time, or with a wait gets the lock once A is complete and released."""
    root = tmp_path / "cache"
    path = cache_dir(root, "toyset", "toy", FIELDS)
    lock_a = WriterLock(path, purpose="extract toy").acquire()
    a = open_cache(root, backend)
    plan_a = a.plan(rows_of(range(0, 10)))

    with pytest.raises(WriterLocked) as refused:
        WriterLock(path, purpose="extract toy").acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "(extract toy) since 20" in message and "transagent" not in message
    advice = hint(refused.value)   # the command line adds the commands
    assert "--wait SECONDS" in advice and f"cache unlock --force {path}" in advice

    waiting, errors = threading.Event(), []

    def writer_b():
        try:
            with writer_lock(path, wait=120, purpose="extract toy", on_wait=lambda holder: waiting.set()):
                b = open_cache(root, backend)
                plan_b = b.plan(rows_of(range(5, 15)))
                b.create_segments()
                write_planned(b, plan_b[0])
                b.finalize()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    thread = threading.Thread(target=writer_b)
    thread.start()
    assert waiting.wait(60), "writer B never started waiting"
    a.create_segments()
    write_planned(a, plan_a[0])
    a.finalize()
    lock_a.release()
    thread.join(120)
    assert not thread.is_alive() and errors == []
    segments = sorted(p.name for p in (path / "segments").glob("*.rows.json"))
    assert segments == ["seg-00000.rows.json", "seg-00001.rows.json"]
    assert_every_row_is_its_own(path, rows_of(range(0, 15)))


def test_extract_stops_at_once_naming_the_holder(data_root, tmp_path, monkeypatch):
    from dataclasses import replace

    from extract.agents import registry

    def must_not_load(request):
        raise AssertionError("a locked cache must be refused before any model loads")

    cache_root = tmp_path / "cache"
    path = planned_dino_path(data_root, cache_root)
    monkeypatch.setitem(registry(), "dino", replace(registry()["dino"], load=must_not_load))
    with WriterLock(path, purpose="extract dino"):
        result = CliRunner().invoke(main, extract_args(data_root, cache_root))
    assert result.exit_code == 1
    assert f"pid {os.getpid()} on host {socket.gethostname()} (extract dino) since" in result.output
    assert "--wait SECONDS" in result.output and not (path / "manifest.json").exists()


def test_extract_with_wait_gets_the_lock_once_released(data_root, tmp_path, monkeypatch):
    import extract.runner.execution

    cache_root = tmp_path / "cache"
    path = planned_dino_path(data_root, cache_root)
    other = WriterLock(path, purpose="merge").acquire()
    told = []

    def other_writer_finishes(where, holder, wait):   # the runner's "waiting for ..." hook
        told.append((where, holder.pid, wait))
        other.release()

    monkeypatch.setattr(extract.runner.execution, "waiting_for_lock", other_writer_finishes)
    result = CliRunner().invoke(main, extract_args(data_root, cache_root, "zarr", "--wait", "30"))
    assert result.exit_code == 0, result.output
    assert told == [(path, os.getpid(), 30.0)]
    assert verify(path) == [] and not other.held


def test_merge_and_install_take_the_writer_lock(tmp_path):
    dst = fill(open_cache(tmp_path / "dst", "zarr"), rows_of([0]))
    src = fill(open_cache(tmp_path / "src", "zarr"), rows_of([0, 1]))
    with WriterLock(src):   # a lock file left in a cache ...
        pass
    pack = pack_cache(src, tmp_path / "src.tar")
    assert pack.rows == 4
    assert all(WRITER not in member for member in _members(tmp_path / "src.tar"))   # ... is never packed
    before = sorted(p.name for p in (dst / "segments").iterdir())
    with WriterLock(dst, purpose="extract toy"):
        with pytest.raises(WriterLocked, match="extract toy"):
            merge(src, dst)
        with pytest.raises(WriterLocked, match="extract toy"):
            install_pack(tmp_path / "src.tar", tmp_path / "dst")
    assert sorted(p.name for p in (dst / "segments").iterdir()) == before
    assert merge(src, dst).added_rows == 2
    assert_every_row_is_its_own(dst, rows_of([0, 1]))


def _members(pack):
    import tarfile

    with tarfile.open(pack) as tar:
        return tar.getnames()


# ---- leases: dead processes, dead nodes, heartbeats, forced unlock ---------------------------------------------

def test_a_dead_nodes_lease_blocks_until_its_heartbeat_times_out(tmp_path):
    path = tmp_path / "cache" / "toyset" / "toy" / "fp"
    lease = write_lease(path, 4242, "node-7", age=STALE_AFTER - 60)
    with pytest.raises(WriterLocked, match=r"pid 4242 on host node-7 \(extract dino\) since 2026-11-30"):
        WriterLock(path).acquire()
    assert json.loads(lease.read_text())["host"] == "node-7"
    stamp = time.time() - STALE_AFTER - 1   # no heartbeat for longer than the timeout: the node is dead
    os.utime(lease, (stamp, stamp))
    with WriterLock(path, purpose="gc") as lock:
        taken = json.loads(lease.read_text())
        assert (taken["pid"], taken["host"], taken["token"]) == (os.getpid(), socket.gethostname(), lock.token)
    assert not lease.exists() and (path / WRITER / LOCK).exists()   # the OS lock file stays for later waiters


def test_a_dead_local_process_and_an_unreadable_lease(tmp_path):
    path = tmp_path / "fp"
    write_lease(path, DEAD_PID, socket.gethostname())   # fresh, but its pid is gone on this very host
    with WriterLock(path):
        pass
    lease = write_lease(path, None, None, text="\x00garbage")
    with pytest.raises(WriterLocked, match="unknown process"):
        WriterLock(path).acquire()
    stamp = time.time() - STALE_AFTER - 1
    os.utime(lease, (stamp, stamp))
    with WriterLock(path):
        pass


def test_heartbeat_keeps_a_live_lease_fresh_and_notices_a_lost_one(tmp_path):
    path = tmp_path / "fp"
    lock = WriterLock(path, heartbeat=0.01).acquire()
    lease = path / WRITER / LEASE
    stamp = time.time() - STALE_AFTER - 1
    os.utime(lease, (stamp, stamp))   # as if the writer had been silent for longer than the timeout ...
    deadline = time.monotonic() + 30
    while lease.stat().st_mtime < time.time() - STALE_AFTER and time.monotonic() < deadline:
        time.sleep(0.01)   # ... until the heartbeat thread refreshes it
    assert lease.stat().st_mtime > time.time() - STALE_AFTER
    with pytest.raises(WriterLocked):
        WriterLock(path).acquire()
    lock.check()
    lease.unlink()   # what `cache unlock --force` on a node without shared OS locks does
    with pytest.raises(WriterLockLost, match="removed"):
        lock.check()
    lock.release()
    assert not lock.held


def test_cache_unlock_force(tmp_path):
    path = tmp_path / "cache" / "toyset" / "toy" / "fp"
    lease = write_lease(path, 4242, "node-7", age=5)   # a node that died a moment ago
    runner = CliRunner()
    refused = runner.invoke(main, ["cache", "unlock", str(path)])
    assert refused.exit_code == 1 and "pid 4242 on host node-7" in refused.output and "--force" in refused.output
    assert lease.exists()
    forced = runner.invoke(main, ["cache", "unlock", "--force", str(path)])
    assert forced.exit_code == 0, forced.output
    assert "removed the writer lease of pid 4242 on host node-7" in forced.output and not lease.exists()
    assert "is not locked" in runner.invoke(main, ["cache", "unlock", str(path)]).output
    with WriterLock(path, purpose="extract dino") as lock:   # a live holder of the OS lock cannot be unlocked
        forced = runner.invoke(main, ["cache", "unlock", "--force", str(path)])
        assert forced.exit_code == 1 and "live process holds its OS file lock" in forced.output
        lock.check()


# ---- timing-based: gc in a loop beside a real extraction --------------------------------------------------------

@pytest.mark.slow
def test_gc_in_a_loop_beside_an_extraction(data_root, tmp_path):
    import subprocess
    import sys

    cache_root, runs_root = tmp_path / "cache", tmp_path / "runs"
    args = extract_args(data_root, cache_root, "hdf5", agents="dino,mae,sam,bert,gpt3")
    process = subprocess.Popen([sys.executable, "-m", "pipelines", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runner = CliRunner()
    while process.poll() is None:
        gc = runner.invoke(main, ["cache", "gc", "--apply", "--cache-root", str(cache_root), "--runs-root",
                                  str(runs_root)])
        assert gc.exit_code == 0, gc.output
    assert process.wait() == 0, process.stdout.read()
    found = sorted(cache_root.glob("synthetic/*/*/manifest.json"))
    assert len(found) == 5 and all(verify(manifest.parent) == [] for manifest in found)

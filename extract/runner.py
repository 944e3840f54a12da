"""Stage 1: run each agent once, one at a time, and write its rows into the cache.

For every agent: work out the rows it needs; if its cache already holds them, skip it without importing torch or
loading a model; otherwise load it, compute the missing rows in batches (writes overlap with compute), free it,
and only then move on to the next agent. A JSON-lines log next to the caches records rows, seconds, images/s and
peak memory per agent.
"""
from __future__ import annotations

import errno
import gc
import importlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from cache_schema import AgentCache, read_json
from cache_schema.fingerprint import sha256_file
from cache_schema.layout import MANIFEST, ROWS, cache_dir, parse_rows, with_schema
from cache_schema.leases import reading
from cache_schema.lock import WriterLock, locked_message
from cache_schema.manifest import check_same_commit, read_manifest
from extract.agents.base import AgentSpec, LoadRequest
from extract.families import ExtractContext


@dataclass
class AgentJob:
    spec: AgentSpec
    ctx: ExtractContext
    request: LoadRequest
    weights: dict[str, str] | None = None      # sha256 per file of a local weights directory (part of the fingerprint)
    skipped_keys: tuple[str, ...] = ()         # unreadable images left out with --on-error skip


@dataclass
class AgentReport:
    agent: str
    status: str                      # "skipped" (already complete) | "done" | "failed"
    cache: str
    rows: int = 0                    # rows computed by this process
    seconds: float = 0.0
    images_per_second: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    model_loaded: bool = False
    error: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class _Progress:
    """How far one agent got; read when it fails, to say what failed (loading or computing) and what was kept."""

    phase: str = "planning"
    rows: int = 0
    model_loaded: bool = False
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0


def family_module(family: str):
    return importlib.import_module(f"extract.families.{family}")


# ---- identity: what a job's cache is, computable without loading anything ---------------------------------------

def cache_fields(job: AgentJob) -> dict:
    """Everything that changes this agent's numbers. Computable without loading the model."""
    fields = {
        "agent": job.spec.fingerprint_fields(job.request.tiny),
        "dataset": {**(job.ctx.dataset_fields or {"name": job.ctx.dataset}), "split_hash": job.ctx.split_hash},
        "family": family_module(job.spec.family).fingerprint_fields(job.ctx),
    }
    if job.weights is not None:  # a local directory: its content, not its path, is the identity
        fields["agent"] = {**fields["agent"], "local_weights": job.weights}
    return fields


def planned_path(job: AgentJob, cache_root) -> Path:
    return cache_dir(cache_root, job.ctx.dataset, job.spec.name, cache_fields(job))


def needed_rows(job: AgentJob) -> list[tuple[str, int]]:
    return sorted(set(family_module(job.spec.family).rows(job.ctx)))


def is_complete(job: AgentJob, cache_root) -> bool:
    """True if the cache is complete and holds every needed row; reads two JSON files, imports nothing heavy."""
    path = planned_path(job, cache_root)
    if not (path / MANIFEST).exists() or not (path / ROWS).exists():
        return False
    manifest = read_manifest(path / MANIFEST)   # a damaged manifest is an error naming it, not a traceback
    if manifest.get("status") != "complete" or manifest.get("fields") != json.loads(
            json.dumps(with_schema(cache_fields(job)))):
        return False
    present = set(parse_rows(read_json(path / ROWS), path / ROWS))
    return all(row in present for row in needed_rows(job))


def local_weights(directory, memo_file: Path | None = None) -> dict[str, str]:
    """{relative file: sha256} of every file under a local weights directory.

    Hashing a 7B checkpoint takes a minute, so digests are memoised in `memo_file` by (absolute path, size,
    mtime): a repeated `extract` only stats the files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"local weights directory {directory} does not exist")
    memo = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    digests, changed = {}, False
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(key)
        if entry is None or entry[:2] != stamp:
            memo[key] = entry = [*stamp, sha256_file(file)]
            changed = True
        digests[file.relative_to(directory).as_posix()] = entry[2]
    if not digests:
        raise FileNotFoundError(f"local weights directory {directory} is empty")
    if changed and memo_file is not None:
        try:  # an optimisation only: a failed write costs a re-hash next time
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(memo, sort_keys=True))
            os.replace(temporary, memo_file)
        except OSError:
            pass
    return digests


# ---- inputs: every needed image must open before any model loads ------------------------------------------------

def image_keys(job: AgentJob) -> list[str]:
    """The dataset images this job reads (language agents read class names, no image)."""
    keys = set(job.ctx.keys)
    return sorted({key for key, _ in needed_rows(job) if key in keys})


def unreadable_images(jobs: list[AgentJob]) -> dict[str, str]:
    """{key: reason} for every image the jobs need that is missing or that Pillow cannot identify (header only)."""
    from PIL import Image, UnidentifiedImageError

    problems, seen = {}, set()
    for job in jobs:
        for key in image_keys(job):
            path = job.ctx.image_path(key)
            if path in seen:
                continue
            seen.add(path)
            try:
                with Image.open(path) as image:
                    image.size  # noqa: B018 - the header is read by open(); nothing is decoded
            except FileNotFoundError:
                problems[key] = f"missing ({path})"
            except (UnidentifiedImageError, OSError, ValueError) as error:
                problems[key] = f"unreadable ({type(error).__name__}: {error})"
    return dict(sorted(problems.items()))


def drop_keys(jobs: list[AgentJob], keys) -> list[AgentJob]:
    """The jobs without these images (`--on-error skip`); each job remembers which of its images it left out."""
    keys = set(keys)
    out = []
    for job in jobs:
        skipped = tuple(key for key in image_keys(job) if key in keys)
        ctx = replace(job.ctx, keys=[key for key in job.ctx.keys if key not in keys])
        out.append(replace(job, ctx=ctx, skipped_keys=tuple(sorted({*job.skipped_keys, *skipped}))))
    return out


# ---- running ----------------------------------------------------------------------------------------------------

def run_agent(job: AgentJob, cache_root, backend: str = "zarr", rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None, progress: bool = True,
              state: _Progress | None = None, wait: float = 0.0) -> AgentReport:
    """Compute and write one agent's missing rows. Rank 0 holds the cache's writer lock from planning to the
    atomic `complete` (waiting up to `wait` seconds for it); the other ranks write their own segments under it."""
    state = state or _Progress()
    path = planned_path(job, cache_root)
    if is_complete(job, cache_root):
        return AgentReport(job.spec.name, "skipped", str(path))
    start = time.perf_counter()
    monitor = MemoryMonitor(job.request.device)
    monitor.start()
    runtime = None
    lock = WriterLock(path, purpose=f"extract {job.spec.name}") if rank == 0 else None
    try:
        family = family_module(job.spec.family)
        state.phase = "loading"
        runtime = job.spec.load(job.request)
        state.model_loaded = True
        monitor.sample()
        # Extra files first, before any directory exists: they read every class at once (e.g. descriptions), so
        # a bad agent input fails here naming everything wrong with it, not one batch's worth later.
        state.phase = "preparing"
        extra_files = family.extra_files(runtime, job.ctx) if rank == 0 else {}
        state.phase = "planning"
        arrays = family.arrays(runtime, job.ctx)
        fields = cache_fields(job)
        if rank == 0:  # one process takes the writer lock, creates the directory and manifest ...
            lock.acquire(wait, on_wait=lambda holder: waiting_for_lock(path, holder, wait))
            AgentCache.open(cache_root, job.ctx.dataset, job.spec.name, fields, arrays, backend)
        barrier()
        cache = AgentCache.open(cache_root, job.ctx.dataset, job.spec.name, fields, arrays, backend)
        # rows an earlier run computed from another hub commit are never extended with this run's
        check_same_commit(cache.manifest, {"provenance": {"resolved_revision": resolved_revision(runtime)}},
                          str(cache.path), "this run's weights")
        plan = cache.plan(needed_rows(job), world_size)  # ... every rank plans from the same disk state ...
        barrier()
        if rank == 0:  # ... and only then are new segments created
            cache.create_segments()
            _record_provenance(cache, runtime, job)
        barrier()
        state.phase = "computing"
        with reading(cache.path):  # `cache gc` must not take a cache that is being written for a partial leftover
            _compute_segments(cache, plan[rank], runtime, family, job, progress, state, monitor)
        state.phase = "finishing"
        if rank == 0:
            for name, data in extra_files.items():
                cache.add_file(name, data)
        barrier()
        if rank == 0:
            lock.check()   # still ours: a writer whose lock was forced open must not mark the cache complete
            cache.finalize()
    finally:
        if lock is not None:
            lock.release()
        runtime = None
        gc.collect()
        _empty_device_cache(job.request.device)
        monitor.stop()
        state.peak_rss_bytes, state.peak_gpu_bytes = monitor.peak_rss, monitor.peak_gpu
    seconds = time.perf_counter() - start
    extra = {"skipped_keys": list(job.skipped_keys)} if job.skipped_keys else {}
    return AgentReport(job.spec.name, "done", str(path), rows=state.rows, seconds=round(seconds, 3),
                       images_per_second=round(state.rows / seconds, 3) if seconds else 0.0,
                       peak_rss_bytes=monitor.peak_rss, peak_gpu_bytes=monitor.peak_gpu, model_loaded=True,
                       extra=extra)


def waiting_for_lock(path: Path, holder, wait: float) -> None:
    """Said once when an extraction starts waiting for another writer (--wait)."""
    print(f"{locked_message(path, holder).split(';')[0]}; waiting up to {wait:g} s", file=sys.stderr, flush=True)


def _record_provenance(cache: AgentCache, runtime, job: AgentJob) -> None:
    """Facts about this run that do not change the numbers: the resolved hub commit, the weights' source record,
    and the images `--on-error skip` left out (cleared again once a later run has them)."""
    revision = resolved_revision(runtime)
    if revision:
        cache.set_provenance("resolved_revision", revision)
    source = getattr(runtime, "source", None)
    if isinstance(source, dict) and source:
        cache.set_provenance("source", source)
    if job.skipped_keys or "skipped_keys" in cache.manifest.get("provenance", {}):
        cache.set_provenance("skipped_keys", list(job.skipped_keys))
    family_facts = getattr(family_module(job.spec.family), "provenance", None)  # e.g. a vision agent's depth
    for key, value in (family_facts(runtime, job.ctx) if family_facts else {}).items():
        cache.set_provenance(key, value)


def resolved_revision(runtime) -> str | None:
    source = getattr(runtime, "source", None)
    return getattr(runtime, "resolved_revision", None) or (source.get("commit") if isinstance(source, dict) else None)


def _compute_segments(cache, assignments, runtime, family, job, progress, state, monitor) -> None:
    from tqdm import tqdm

    total = sum(len(rows) for _, rows in assignments)
    bar = tqdm(total=total, desc=f"extract {job.spec.name}", unit="row", disable=not progress)
    for name, local_rows in assignments:
        with cache.segment_writer(name) as writer, BackgroundWriter(writer) as background:
            for batch, todo in aligned_batches(local_rows, len(writer.rows), job.ctx.batch_size):
                arrays = family.compute(runtime, [writer.rows[i] for i in batch], job.ctx)
                monitor.sample()
                keep = [batch.index(i) for i in todo]
                background.put(todo, {key: value[keep] for key, value in arrays.items()})
                state.rows += len(todo)
                bar.update(len(todo))
    bar.close()


def aligned_batches(todo: list[int], segment_rows: int, batch_size: int):
    """(batch, rows to write) on fixed boundaries of the segment, so a resumed run computes every row in the same
    batch as an uninterrupted run would (batch composition can change the last bits, e.g. through padding)."""
    missing = set(todo)
    for first in sorted({row // batch_size * batch_size for row in todo}):
        batch = list(range(first, min(first + batch_size, segment_rows)))
        yield batch, [row for row in batch if row in missing]


class BackgroundWriter:
    """Writes batches on a thread so disk I/O overlaps the next batch's compute; errors surface on the caller."""

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = error

    def put(self, rows, arrays) -> None:
        self._raise()
        self._queue.put((rows, arrays))

    def _raise(self):
        if self._error is not None:
            raise self._error

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._queue.put(None)
        self._thread.join()
        if exc[0] is None:
            self._raise()


class MemoryMonitor:
    """Peak resident memory and peak GPU allocation while one agent runs.

    RSS is sampled on a thread and at the points where it peaks (model loaded, batch computed), so a short run
    still records its model."""

    def __init__(self, device: str, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.peak_rss = self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, current_rss())

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.device.startswith("cuda"):
            import torch

            self.peak_gpu = int(torch.cuda.max_memory_allocated())


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run(jobs: list[AgentJob], cache_root, backend: str = "zarr", log_path: Path | None = None, rank: int = 0,
        world_size: int = 1, barrier: Callable[[], None] = lambda: None, progress: bool = True,
        keep_going: bool = True, wait: float = 0.0) -> list[AgentReport]:
    """Run agents one after another. A failing agent (out of memory, a full disk, a missing checkpoint) is reported
    with what to do about it; the caches of agents that finished stay complete, and with `keep_going` the
    remaining agents still run."""
    reports = []
    for job in jobs:
        state = _Progress()
        try:
            report = run_agent(job, cache_root, backend, rank, world_size, barrier, progress, state, wait)
        except Exception as error:  # noqa: BLE001 - reported per agent, then re-raised or collected
            report = AgentReport(job.spec.name, "failed", str(planned_path(job, cache_root)), rows=state.rows,
                                 peak_rss_bytes=state.peak_rss_bytes, peak_gpu_bytes=state.peak_gpu_bytes,
                                 model_loaded=state.model_loaded, error=explain(error, job, state.phase),
                                 extra={"phase": state.phase})
            if not keep_going:
                log(log_path, report, rank)
                raise
        if report.status == "failed":  # the traceback held the failed agent's frames: free them before the next
            gc.collect()
            _empty_device_cache(job.request.device)
        reports.append(report)
        log(log_path, report, rank)
    return reports


def explain(error: BaseException, job: AgentJob, phase: str = "computing") -> str:
    """The error and what to do about it, for the failures a long extraction meets: memory and disk."""
    text = f"{type(error).__name__}: {error}"
    name = job.spec.name
    if _is_out_of_memory(error):
        if phase == "loading":
            return (f"{text}\n  agent {name!r} does not fit in memory on {job.request.device} "
                    f"({job.request.dtype}); free the device or use a larger one. Finished agents' caches stay "
                    "complete.")
        return (f"{text}\n  agent {name!r} ran out of memory at --batch-size {job.ctx.batch_size}; re-run with a "
                "smaller --batch-size (rows already written are kept). Finished agents' caches stay complete.")
    if _is_disk_full(error):
        return (f"{text}\n  the disk is full: the cache of agent {name!r} stays partial, finished agents' caches "
                "stay complete; free space (e.g. `transagent cache gc`) and re-run the same command, which resumes "
                "after the rows already written.")
    return text


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_out_of_memory(error: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
               or (isinstance(e, OSError) and e.errno == errno.ENOMEM) or "out of memory" in str(e).lower()
               for e in _causes(error))


def _is_disk_full(error: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _causes(error))


def log(log_path, entry, rank: int) -> None:
    """Append one JSON line (an AgentReport or a dict) to the extraction log."""
    if log_path is None:
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    data = entry.__dict__ if isinstance(entry, AgentReport) else dict(entry)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rank": rank, **data}
    with open(log_path, "a") as handle:
        handle.write(json.dumps(line) + "\n")

"""Running one agent, then the next: load it, plan and write its missing rows, free it.

Rank 0 holds the cache's writer lock from planning to the atomic `complete`; every rank plans from the same disk
state and writes only its own segments. Rows are batched on fixed boundaries, so a resumed run computes every row
as an uninterrupted one would. The thread that calls the model does nothing else: loader workers make the batches'
inputs (`inputs.prefetched`) and a writer thread converts, hashes and writes their rows (`BackgroundWriter`).
"""
from __future__ import annotations

import errno
import gc
import queue
import threading
import time
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from cache_schema import AgentCache
from cache_schema.leases import reading
from cache_schema.lock import WriterLock
from cache_schema.manifest import check_same_commit
from extract.runner.inputs import prefetched
from extract.runner.monitoring import (AgentReport, MemoryMonitor, Progress, empty_device_cache, log,
                                       waiting_for_lock)
from extract.runner.plan import AgentJob, cache_fields, family_module, is_complete, needed_rows, planned_path


def run_agent(job: AgentJob, cache_root, backend: str = "zarr", rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None, progress: bool = True,
              state: Progress | None = None, wait: float = 0.0) -> AgentReport:
    """Compute and write one agent's missing rows. Rank 0 holds the cache's writer lock from planning to the
    atomic `complete` (waiting up to `wait` seconds for it); the other ranks write their own segments under it."""
    state = state or Progress()
    path = planned_path(job, cache_root)
    if is_complete(job, cache_root):
        return AgentReport(job.spec.name, "skipped", str(path))
    start = time.perf_counter()
    monitor = MemoryMonitor(job.request.device)
    monitor.start()
    runtime = None
    lock = WriterLock(path, purpose=f"extract {job.spec.name}") if rank == 0 else None
    frozen = freeze_heap()
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
        computing = time.perf_counter()
        with reading(cache.path):  # `cache gc` must not take a cache that is being written for a partial leftover
            _compute_segments(cache, plan[rank], runtime, family, job, progress, state, monitor)
        compute_seconds = time.perf_counter() - computing
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
        if frozen:
            gc.unfreeze()
        empty_device_cache(job.request.device)
        monitor.stop()
        state.peak_rss_bytes, state.peak_gpu_bytes = monitor.peak_rss, monitor.peak_gpu
    seconds = time.perf_counter() - start
    extra = {"skipped_keys": list(job.skipped_keys)} if job.skipped_keys else {}
    return AgentReport(job.spec.name, "done", str(path), rows=state.rows, seconds=round(seconds, 3),
                       images_per_second=round(state.rows / seconds, 3) if seconds else 0.0,
                       compute_seconds=round(compute_seconds, 3), peak_rss_bytes=monitor.peak_rss,
                       peak_gpu_bytes=monitor.peak_gpu, model_loaded=True,
                       extra=extra)


def freeze_heap() -> bool:
    """Hide every object that exists before an agent loads from the garbage collector (`gc.freeze`), so the
    collection that frees the agent scans what came after, not the ~400k objects of torch and transformers
    (0.3-0.5 s per agent on a small CPU). Not done where the process froze objects itself: unfreezing is global."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


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
    total = sum(len(rows) for _, rows in assignments)
    bar = tqdm(total=total, desc=f"extract {job.spec.name}", unit="row", disable=not progress)
    finish = partial(family.finish, ctx=job.ctx) if hasattr(family, "finish") else None
    for name, local_rows in assignments:
        with cache.segment_writer(name) as writer, BackgroundWriter(writer, finish) as background, \
                closing(computed_batches(runtime, family, job.ctx, writer.rows, local_rows)) as batches:
            for todo, arrays in batches:
                monitor.sample()
                background.put(todo, arrays)
                state.rows += len(todo)
                bar.update(len(todo))
    bar.close()


def computed_batches(runtime, family, ctx, segment_rows: list, todo: list[int]):
    """(rows to write, their arrays) for each aligned batch of a segment's rows to do.

    A family that splits its work by thread (`prepare`, `finish`: see `extract.families`) has each batch's inputs
    made by loader workers, and returns arrays for `finish` on the writer's thread: this thread runs the model."""
    split = hasattr(family, "prepare")

    def rows_of(batch):
        return [segment_rows[i] for i in batch]

    def prepare(item):
        return family.prepare(runtime, rows_of(item[0]), ctx)

    batches = aligned_batches(todo, len(segment_rows), ctx.batch_size)
    with closing(prefetched(batches, prepare if split else None)) as loaded:
        for (batch, write), prepared in loaded:
            if split:
                arrays = family.compute(runtime, rows_of(batch), ctx, prepared, stored=False)
            else:
                arrays = family.compute(runtime, rows_of(batch), ctx)
            if len(write) < len(batch):   # a resumed batch: only its missing rows are written
                keep = [batch.index(i) for i in write]
                arrays = {key: value[keep] for key, value in arrays.items()}
            yield write, arrays


def aligned_batches(todo: list[int], segment_rows: int, batch_size: int):
    """(batch, rows to write) on fixed boundaries of the segment, so a resumed run computes every row in the same
    batch as an uninterrupted run would (batch composition can change the last bits, e.g. through padding)."""
    missing = set(todo)
    for first in sorted({row // batch_size * batch_size for row in todo}):
        batch = list(range(first, min(first + batch_size, segment_rows)))
        yield batch, [row for row in batch if row in missing]


class BackgroundWriter:
    """Writes batches on a thread so disk I/O overlaps the next batch's compute; errors surface on the caller.

    `finish` (arrays -> arrays), when given, runs on that thread first: e.g. the cast to the cache's dtype."""

    def __init__(self, writer, finish: Callable[[dict], dict] | None = None, depth: int = 2):
        self.writer, self.finish = writer, finish
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    rows, arrays = item
                    self.writer.write(rows, arrays if self.finish is None else self.finish(arrays))
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


def run(jobs: list[AgentJob], cache_root, backend: str = "zarr", log_path: Path | None = None, rank: int = 0,
        world_size: int = 1, barrier: Callable[[], None] = lambda: None, progress: bool = True,
        keep_going: bool = True, wait: float = 0.0) -> list[AgentReport]:
    """Run agents one after another. A failing agent (out of memory, a full disk, a missing checkpoint) is reported
    with what to do about it; the caches of agents that finished stay complete, and with `keep_going` the
    remaining agents still run."""
    reports = []
    for job in jobs:
        state = Progress()
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
            empty_device_cache(job.request.device)
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

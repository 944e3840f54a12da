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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache_schema import AgentCache, read_json
from cache_schema.pack import reading
from cache_schema.store import MANIFEST, ROWS, cache_dir, with_schema
from extract.agents.base import AgentSpec, LoadRequest
from extract.families import ExtractContext


@dataclass
class AgentJob:
    spec: AgentSpec
    ctx: ExtractContext
    request: LoadRequest


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


def family_module(family: str):
    return importlib.import_module(f"extract.families.{family}")


def cache_fields(job: AgentJob) -> dict:
    """Everything that changes this agent's numbers. Computable without loading the model."""
    return {
        "agent": job.spec.fingerprint_fields(job.request.tiny),
        "dataset": {"name": job.ctx.dataset, "split_hash": job.ctx.split_hash},
        "family": family_module(job.spec.family).fingerprint_fields(job.ctx),
    }


def planned_path(job: AgentJob, cache_root) -> Path:
    return cache_dir(cache_root, job.ctx.dataset, job.spec.name, cache_fields(job))


def needed_rows(job: AgentJob) -> list[tuple[str, int]]:
    return sorted(set(family_module(job.spec.family).rows(job.ctx)))


def is_complete(job: AgentJob, cache_root) -> bool:
    """True if the cache is complete and holds every needed row; reads two JSON files, imports nothing heavy."""
    path = planned_path(job, cache_root)
    if not (path / MANIFEST).exists() or not (path / ROWS).exists():
        return False
    manifest = read_json(path / MANIFEST)
    if manifest.get("status") != "complete" or manifest.get("fields") != json.loads(
            json.dumps(with_schema(cache_fields(job)))):
        return False
    present = {(key, int(view)) for key, view in read_json(path / ROWS)}
    return all(row in present for row in needed_rows(job))


def run_agent(job: AgentJob, cache_root, backend: str = "zarr", rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None, progress: bool = True) -> AgentReport:
    path = planned_path(job, cache_root)
    if is_complete(job, cache_root):
        return AgentReport(job.spec.name, "skipped", str(path))
    start = time.perf_counter()
    monitor = MemoryMonitor(job.request.device)
    monitor.start()
    runtime = None
    try:
        family = family_module(job.spec.family)
        runtime = job.spec.load(job.request)
        arrays = family.arrays(runtime, job.ctx)
        fields = cache_fields(job)
        if rank == 0:  # one process creates the directory and manifest ...
            AgentCache.open(cache_root, job.ctx.dataset, job.spec.name, fields, arrays, backend)
        barrier()
        cache = AgentCache.open(cache_root, job.ctx.dataset, job.spec.name, fields, arrays, backend)
        plan = cache.plan(needed_rows(job), world_size)  # ... every rank plans from the same disk state ...
        barrier()
        if rank == 0:  # ... and only then are new segments created
            cache.create_segments()
            revision = getattr(runtime, "resolved_revision", None)
            if revision:
                cache.set_provenance("resolved_revision", revision)
        barrier()
        with reading(cache.path):  # `cache gc` must not take a cache that is being written for a partial leftover
            computed = _compute_segments(cache, plan[rank], runtime, family, job, progress)
        if rank == 0:
            for name, data in family.extra_files(runtime, job.ctx).items():
                cache.add_file(name, data)
        barrier()
        if rank == 0:
            cache.finalize()
    finally:
        runtime = None
        gc.collect()
        _empty_device_cache(job.request.device)
        monitor.stop()
    seconds = time.perf_counter() - start
    return AgentReport(job.spec.name, "done", str(path), rows=computed, seconds=round(seconds, 3),
                       images_per_second=round(computed / seconds, 3) if seconds else 0.0,
                       peak_rss_bytes=monitor.peak_rss, peak_gpu_bytes=monitor.peak_gpu, model_loaded=True)


def _compute_segments(cache, assignments, runtime, family, job, progress) -> int:
    from tqdm import tqdm

    total = sum(len(rows) for _, rows in assignments)
    bar = tqdm(total=total, desc=f"extract {job.spec.name}", unit="row", disable=not progress)
    computed = 0
    for name, local_rows in assignments:
        with cache.segment_writer(name) as writer, BackgroundWriter(writer) as background:
            for start in range(0, len(local_rows), job.ctx.batch_size):
                batch = local_rows[start:start + job.ctx.batch_size]
                arrays = family.compute(runtime, [writer.rows[i] for i in batch], job.ctx)
                background.put(batch, arrays)
                computed += len(batch)
                bar.update(len(batch))
    bar.close()
    return computed


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
    """Peak resident memory (sampled) and peak GPU allocation while one agent runs."""

    def __init__(self, device: str, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.peak_rss = self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, current_rss())
            self._stop.wait(self.interval)

    def start(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, current_rss())
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
        keep_going: bool = True) -> list[AgentReport]:
    """Run agents one after another. A failing agent (e.g. out of memory) leaves the others' caches valid."""
    reports = []
    for job in jobs:
        try:
            report = run_agent(job, cache_root, backend, rank, world_size, barrier, progress)
        except Exception as error:  # noqa: BLE001 - reported per agent, then re-raised or collected
            report = AgentReport(job.spec.name, "failed", str(planned_path(job, cache_root)), error=explain(error, job))
            if not keep_going:
                _log(log_path, report, rank)
                raise
        reports.append(report)
        _log(log_path, report, rank)
    return reports


def explain(error: BaseException, job: AgentJob) -> str:
    """A message that names what to do about the common failures."""
    text = f"{type(error).__name__}: {error}"
    if "out of memory" in text.lower() or type(error).__name__ == "OutOfMemoryError":
        return (f"{text}\n  agent {job.spec.name!r} ran out of memory at --batch-size {job.ctx.batch_size}; "
                "finished agents' caches stay valid; re-run with a smaller --batch-size (rows already written are kept)")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"{text}\n  the disk is full; the cache stays partial and a re-run resumes after space is freed"
    return text


def _log(log_path, report: AgentReport, rank: int) -> None:
    if log_path is None:
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rank": rank, **report.__dict__}
    with open(log_path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")

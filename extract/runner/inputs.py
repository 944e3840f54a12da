"""The images a job reads: every needed image must open before any model loads (`--on-error` decides the rest),
and each batch's inputs are made by loader workers while the model computes the batch before."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Iterable, Iterator, TypeVar

from PIL import Image, UnidentifiedImageError

from extract.runner.plan import AgentJob, needed_rows

# Decoding, resizing and normalising release the GIL, so threads overlap them with the model (no pickling, no fork
# of a process that holds a model). One batch ahead per worker keeps the model fed without holding many batches.
LOADER_WORKERS = min(4, os.cpu_count() or 1)

Item = TypeVar("Item")
_END = object()


def image_keys(job: AgentJob) -> list[str]:
    """The dataset images this job reads (language agents read class names, no image)."""
    keys = set(job.ctx.keys)
    return sorted({key for key, _ in needed_rows(job) if key in keys})


def unreadable_images(jobs: list[AgentJob]) -> dict[str, str]:
    """{key: reason} for every image the jobs need that is missing or that Pillow cannot identify (header only)."""
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


def prefetched(items: Iterable[Item], prepare: Callable[[Item], object] | None,
               workers: int = LOADER_WORKERS) -> Iterator[tuple[Item, object]]:
    """(item, prepare(item)) in order, each prepared on a worker thread up to `workers` items ahead. An item whose
    preparation failed raises its error when its turn comes, after the items before it; closing the generator
    cancels what was not started. With prepare None: (item, None), nothing ahead."""
    if prepare is None:
        yield from ((item, None) for item in items)
        return
    items = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="extract-loader") as pool:
        pending: deque = deque()
        try:
            while True:
                while len(pending) <= workers and (item := next(items, _END)) is not _END:
                    pending.append((item, pool.submit(prepare, item)))
                if not pending:
                    return
                item, future = pending.popleft()
                yield item, future.result()
        finally:
            for _, future in pending:
                future.cancel()


"""The images a job reads: every needed image must open before any model loads (`--on-error` decides the rest)."""
from __future__ import annotations

from dataclasses import replace

from PIL import Image, UnidentifiedImageError

from extract.runner.plan import AgentJob, needed_rows


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

"""One dataset's extraction: the plan, every check that can fail before a model loads (texts, images, the size
limit, the device, the cache root, other writers), the agents' preflight, then the run. Under torchrun each rank
writes its own segments and rank 0 finalises; the ranks only read the dataset (it is prepared before they start).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from cache_schema import CacheError
from cache_schema.lock import current_holder, locked_message
from extract.agents import registry
from extract.distributed import process_group, rank_and_world
from extract.runner import drop_keys, is_complete, planned_path, run, unreadable_images
from extract.runner import log as journal
from pipelines.cache_hints import explained, locked_hint
from pipelines.config.extract import ExtractOptions
from pipelines.datasets import DatasetError, dataset_slug, get_info, prepare
from pipelines.datasets.preparation import missing_downloads
from pipelines.devices import compute_dtype, planning_device, resolve_device
from pipelines.extraction import build_jobs, check_size, estimate_bytes, format_bytes, skipped_agents
from pipelines.presets import register_model_configs, resolve_agents
from pipelines.roots import require_writable
from pipelines.texts import needed_descriptions

log = logging.getLogger(__name__)
MAX_LISTED = 10  # bad images named in an error


class ExtractError(ValueError):
    """An extraction that cannot start (or an agent that failed); the message says what to do."""


def log_path(options: ExtractOptions) -> Path:
    return options.log or Path(options.cache_root) / dataset_slug(options.dataset, options.dataset_name) / \
        "extract.jsonl"


def extract_dataset(options: ExtractOptions, dry_run: bool = False, submitting: str | None = None,
                    progress: bool = True) -> list:
    """One dataset's extraction in this process (or this torchrun rank). With dry_run, the plan only; with
    submitting (the --cluster the tasks go to), the plan after this node's checks, before any model loads. Both
    return the jobs whose caches are incomplete; a run returns the jobs it ran."""
    rank, world_size = rank_and_world()
    try:
        ready = _prepare_dataset(options, world_size, download=not dry_run)
        skipped = skipped_agents(options, registry())  # weights that need a manual step
        jobs = build_jobs(options, ready, skipped=skipped)  # + texts a dataset lacks (e.g. gpt3's)
    except (ValueError, OSError, KeyError, DatasetError) as error:
        raise ExtractError(str(error.args[0] if isinstance(error, KeyError) else error)) from None
    if skipped:
        line = f"skipped {len(skipped)} agent(s): " + "; ".join(f"{name}: {why}" for name, why in skipped.items())
        if options.strict:
            raise ExtractError(f"{line} (--strict)")
        log.info("%s (--strict makes this an error)", line)
        jobs = [job for job in jobs if job.spec.name not in skipped]
    try:
        todo = [job for job in jobs if not is_complete(job, options.cache_root)]
    except CacheError as error:
        raise ExtractError(explained(error)) from None
    device = options.device
    if todo and not dry_run:  # before any image is read or model loaded
        device = planning_device(device, submitting) if submitting is not None else resolve_device(device)
    bad = unreadable_images(todo)
    if bad:
        todo = _skip_unreadable(options, todo, bad, log_this=rank == 0 and not dry_run and submitting is None)
        todo = [job for job in todo if not is_complete(job, options.cache_root)]
    _log_plan(options, jobs, todo)
    if dry_run or not todo:
        return todo
    require_writable(options.cache_root, "--cache-root")  # before any model loads
    if not options.wait:
        _refuse_locked_caches(todo, options.cache_root)
    for job in todo:
        job.ctx.device = job.request.device = device
        job.request.dtype = compute_dtype(device)
    if options.preset == "tiny" or any(job.request.tiny for job in todo):
        register_model_configs()
    if submitting is not None:
        return todo
    todo = preflight(todo, options)
    if todo:
        _run(todo, options, device, rank, world_size, progress)
    return todo


def _skip_unreadable(options: ExtractOptions, todo: list, bad: dict, log_this: bool) -> list:
    """--on-error: stop naming the images, or leave them out (logged to the extraction log by one process)."""
    listed = "\n".join(f"  {key}: {reason}" for key, reason in list(bad.items())[:MAX_LISTED])
    if options.on_error == "stop":
        raise ExtractError(
            f"{len(bad)} image(s) needed for extraction cannot be read; the first {min(len(bad), MAX_LISTED)}:"
            f"\n{listed}\nNo cache was written. Restore them, or re-run with --on-error skip to leave them out.")
    todo = drop_keys(todo, bad)
    if not any(job.ctx.keys for job in todo):
        raise ExtractError(f"none of the images needed for extraction can be read:\n{listed}")
    log.info("skipping %d unreadable image(s) (--on-error skip):\n%s", len(bad), listed)
    if log_this:   # a submitted task logs it itself
        require_writable(options.cache_root, "--cache-root")
        journal(log_path(options), {"event": "skipped_images", "count": len(bad), "images": bad}, 0)
    return todo


def _log_plan(options: ExtractOptions, jobs: list, todo: list) -> None:
    """The plan and its size, then the limit (refused here, before anything is written)."""
    sizes = estimate_bytes(todo)
    log.info("extract %s (%s, shots %s, seeds %s): %d job(s), %d already complete", options.dataset,
             ", ".join(options.protocols), ",".join(map(str, options.shots)), ",".join(map(str, options.seeds)),
             len(jobs), len(jobs) - len(todo))
    for name, size in sizes.items():
        log.info("  %-16s up to %s", name, format_bytes(size))
    log.info("  total            up to %s (limit --max-bytes %s)", format_bytes(sum(sizes.values())),
             format_bytes(options.max_bytes))
    check_size(sizes, options.max_bytes)


def _run(todo: list, options: ExtractOptions, device: str, rank: int, world_size: int, progress: bool) -> None:
    with process_group(world_size, device) as barrier:
        reports = run(todo, options.cache_root, backend=options.backend, log_path=log_path(options), rank=rank,
                      world_size=world_size, barrier=barrier, progress=progress and (sys.stderr.isatty() or rank == 0),
                      keep_going=world_size == 1, wait=options.wait)
    for report in reports:
        log.info("  %-8s %-8s rows %6d  %8.1f s  %8.1f rows/s  peak RSS %s", report.agent, report.status,
                 report.rows, report.seconds, report.images_per_second, format_bytes(report.peak_rss_bytes))
    failed = [report for report in reports if report.status == "failed"]
    if failed:
        raise ExtractError("\n".join(f"agent {r.agent} failed: {r.error}" for r in failed))


def _refuse_locked_caches(jobs, cache_root) -> None:
    """Another writer holds one of these caches: stop now, before any model loads (every rank sees the same)."""
    held = [(path, holder) for path in dict.fromkeys(planned_path(job, cache_root) for job in jobs)
            if (holder := current_holder(path)) is not None]
    if held:
        raise ExtractError("\n".join(f"{locked_message(path, holder)}\n  {locked_hint(path)}"
                                     for path, holder in held))


def _prepare_dataset(options: ExtractOptions, world_size: int, download: bool):
    """Fetch what the dataset and the selected agents' texts need (images, split file, official descriptions) before
    planning; under torchrun the ranks only read (`make extract` prepares before it starts them)."""
    info = get_info(options.dataset)
    wanted = needed_descriptions(resolve_agents(options.agents, tuple(registry())), dict(options.descriptions),
                                 options.agent_settings)
    if world_size > 1 or (info.split_path(options.data_root).exists()
                          and not missing_downloads(info, options.data_root, wanted)):
        return None
    return prepare(options.dataset, options.data_root, download=download, verify=False, descriptions=wanted)


def preflight(todo: list, options: ExtractOptions) -> list:
    """Before any extraction: download and convert published checkpoints, then load every agent that still has
    work (`agents check`), so a checkpoint that cannot load fails now, not hours in, with every problem listed.
    The tiny preset builds its agents from code, with nothing to download or verify."""
    if options.preset == "tiny":
        log.info("agents check: the tiny preset builds every agent from its config (nothing to download or verify)")
        return todo
    from pipelines.agent_check import format_result, items_from_jobs, run_checks, summary  # loads torch

    items = items_from_jobs(todo, options)
    results = run_checks(items, options, on_result=lambda result: log.info("%s", format_result(result)))
    log.info("%s", summary(results))
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise ExtractError("agents check failed, nothing was extracted:\n" +
                           "\n".join(f"agent {result.agent} failed: {result.error}" for result in failed))
    weights = {item.spec.name: item.weights for item in items if item.downloads}  # now with the checkpoint's sha256
    for job in todo:
        job.weights = weights.get(job.spec.name, job.weights)
    return [job for job in todo if not is_complete(job, options.cache_root)]  # a pin can name a finished cache

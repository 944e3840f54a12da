"""`transagent extract`: stage 1. Under torchrun each rank writes its own segments; rank 0 finalises."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from pipelines import console
from pipelines import options as opt
from pipelines import progress as bars
from pipelines.devices import DeviceError, planning_device, resolve_device
from pipelines.launch import LAUNCH_PARAMS

MAX_LISTED = 10  # bad images named in an error


def _parse_layers(ctx, param, value):
    if value in (None, "", "all"):
        return None
    try:
        layers = tuple(sorted({int(v) for v in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"expected 'all' or 0-based layer indices like '3,7,11', got {value!r}")
    if any(layer < 0 for layer in layers):
        raise click.BadParameter("layer indices are 0-based and non-negative")
    return layers


def _parse_ints(ctx, param, value):
    try:
        return tuple(int(v) for v in str(value).replace(" ", ",").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected integers like '1,2,4,8,16', got {value!r}")


def _positive_bytes(ctx, param, value):
    if not value > 0:  # also refuses nan, which compares false with everything and so would mean "no limit"
        raise click.BadParameter(f"expected a positive number of bytes like 50e9 (or inf for no limit), got {value}")
    return value


@click.command()
@click.option("--datasets", "--dataset", "datasets", default="eurosat", show_default=True,
              help="Dataset name, or comma-separated names (one after another; one submission with submitit).")
@opt.dataset_name
@opt.data_root
@opt.cache_root
@opt.preset
@opt.agents
@click.option("--protocol", type=click.Choice(["base2novel", "fewshot", "all"]), default="base2novel",
              show_default=True, help="Which training images to cache: base classes, all classes, or both.")
@click.option("--shots", default="16", show_default=True, callback=_parse_ints, help="Shots, e.g. 16 or 1,2,4,8,16.")
@opt.seeds
@click.option("--split", type=click.Choice(["train"]), default="train", show_default=True)
@click.option("--views", type=click.IntRange(1), default=4, show_default=True,
              help="Views per training image for vision agents (view 0 = un-augmented).")
@click.option("--view-seed", type=int, default=0, show_default=True)
@click.option("--layers", default="all", callback=_parse_layers, help="0-based agent layers to keep, or 'all'.")
@click.option("--token-pool", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="2 = average 2x2 tokens (14x14 -> 7x7 grid).")
@click.option("--dtype", type=click.Choice(["float16", "float32", "int8"]), default="float16", show_default=True)
@click.option("--max-bytes", type=float, default=50e9, show_default=True, callback=_positive_bytes,
              help="Refuse to write more than this.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto.")
@click.option("--backend", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--agent-path", "agent_paths", multiple=True, callback=opt.parse_agent_pairs,
              help="AGENT=PATH: load an agent from a local directory (shikra needs one, else it is skipped; "
                   "vitdet and mae are otherwise downloaded and converted).")
@click.option("--descriptions", "descriptions", multiple=True, callback=opt.parse_agent_pairs,
              help="AGENT=FILE: class descriptions JSON for gpt3 or vicuna, instead of the official file that "
                   "`datasets prepare` fetches (e.g. gpt3=gpt3_eurosat.json).")
@click.option("--agent-option", "agent_settings", multiple=True, callback=opt.parse_agent_settings,
              help="AGENT:KEY=VALUE, e.g. vicuna:descriptions=generate, sd:conditioning=template, "
                   "pixart:template=coop (README, Agents).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="JSON-lines log (default: <cache-root>/<dataset>/extract.jsonl).")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="A needed image is missing or unreadable: stop before any model loads, or leave it out "
                   "(listed in the log and in the cache manifest).")
@click.option("--dry-run", is_flag=True, help="Print the plan and size estimate, write nothing.")
@click.option("--strict", is_flag=True,
              help="An agent that would be skipped (e.g. shikra without --agent-path) is an error.")
@opt.wait
@opt.launcher_options
@bars.quiet_option
def extract(datasets, launcher, **params):
    """Stage 1: run each agent once and cache what it knows.

    \b
    With --launcher submitit: one job per (dataset, agent) with incomplete caches, all into the same cache root;
    the dataset preparation, the plan, the image check, the size limit and the agents' check run here first.
    """
    if int(os.environ.get("RANK", 0)) == 0:   # under torchrun, rank 0 speaks for all
        console.show_messages()
    opt.check_launcher_flags(click.get_current_context(), launcher)
    names = [name.strip() for name in datasets.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("at least one dataset is needed", param_hint="--datasets")
    if params["dataset_name"] and len(names) > 1:
        raise click.BadParameter("names the directory of one folder:<dir> dataset; extract the datasets one at a "
                                 "time", param_hint="--dataset-name")
    if launcher == "submitit":
        return _submit(names, params)
    params = {name: value for name, value in params.items() if name not in LAUNCH_PARAMS}
    for dataset in names:
        extract_dataset(dataset, **params)


def _submit(names, params):
    from pipelines.launch import LaunchError, LaunchOptions, summary
    from pipelines.submit import submit_extraction

    options = LaunchOptions.from_params(params)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise click.UsageError("--launcher submitit submits from one process; run it without torchrun")
    if params["dry_run"]:
        from pipelines.submit import extraction_tasks

        # Each dataset is planned here as `extract --dry-run` plans it: jobs, image check, size limit.
        plans = {dataset: extract_dataset(dataset, **params)[0] for dataset in names}
        for task in extraction_tasks(plans, params):
            click.echo(f"  {task.name}: transagent {shlex.join(task.argv)}"
                       + (f"   (after {', '.join(task.after)})" if task.after else ""))
        return
    # Everything the in-process extraction checks before a model loads runs here: preparation (downloads), plan,
    # image check, size limit, device, a writable cache root, no other writer (unless --wait).
    planned = {dataset: extract_dataset(dataset, **params, submitting=options.cluster) for dataset in names}
    # Model weights must be in the Hugging Face cache the compute nodes read (tasks run with HF_HUB_OFFLINE=1):
    # the agents' preflight (`agents check`) downloads, converts and loads each agent with work here.
    plans = {dataset: _preflight(todo, extract_options, click.echo) if todo else []
             for dataset, (todo, extract_options) in planned.items()}
    if not any(plans.values()):
        click.echo("every cache is complete: nothing to submit")
        return
    job_dir = options.job_dir or Path(params["cache_root"]) / ".jobs"
    opt.require_writable(job_dir, "--job-dir")
    try:
        states = submit_extraction(plans, params, options, job_dir)
    except LaunchError as error:
        raise click.ClickException(str(error)) from None
    if not options.wait:
        click.echo(f"submitted; `transagent cache ls --cache-root {params['cache_root']}` shows the caches' status")
        return
    click.echo("")
    click.echo(summary(states))
    failed = [state for state in states if state.status in ("failed", "not run")]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(states)} extraction task(s) did not finish: "
                                   + "; ".join(f"{s.task.name} ({s.log or s.note})" for s in failed))


def extract_dataset(dataset, dataset_name, data_root, cache_root, preset, agents, protocol, shots, seeds, split,
                    views, view_seed, layers, token_pool, dtype, max_bytes, batch_size, device, backend, agent_paths,
                    descriptions, agent_settings, log_path, on_error, dry_run, wait, strict, submitting=None):
    """One dataset's extraction in this process (or this torchrun rank). With dry_run, the plan only; with
    submitting (the --cluster the tasks go to), the plan after this node's checks, before any model loads. Both
    return (the jobs whose caches are incomplete, the ExtractOptions)."""
    from cache_schema import CacheError
    from extract.agents import registry
    from extract.runner import drop_keys, is_complete, log, run, unreadable_images
    from pipelines.datasets import DatasetError, dataset_slug
    from pipelines.extraction import ExtractOptions, build_jobs, estimate_bytes, format_bytes, skipped_agents

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    protocols = ("base2novel", "fewshot") if protocol == "all" else (protocol,)
    options = ExtractOptions(
        dataset=dataset, dataset_name=dataset_name, data_root=data_root, cache_root=cache_root, preset=preset,
        agents=agents, protocols=protocols, shots=shots, seeds=tuple(seeds), views=views, view_seed=view_seed,
        layers=layers, token_pool=int(token_pool), dtype=dtype, batch_size=batch_size, device=device, backend=backend,
        agent_paths=agent_paths, agent_options={name: {"descriptions": path} for name, path in descriptions.items()},
        agent_settings=agent_settings)
    say = click.echo if rank == 0 else (lambda *a, **k: None)
    try:
        ready = _prepare_dataset(options, world_size, download=not dry_run, echo=say)
        skipped = skipped_agents(options, registry())  # weights that need a manual step
        jobs = build_jobs(options, ready, echo=say, skipped=skipped)  # + texts a dataset lacks (e.g. gpt3's)
    except (ValueError, OSError, KeyError, DatasetError) as error:
        raise click.ClickException(str(error.args[0] if isinstance(error, KeyError) else error))
    if skipped:
        line = f"skipped {len(skipped)} agent(s): " + "; ".join(f"{name}: {why}" for name, why in skipped.items())
        if strict:
            raise click.ClickException(f"{line} (--strict)")
        say(f"{line} (--strict makes this an error)")
        jobs = [job for job in jobs if job.spec.name not in skipped]
    try:
        todo = [job for job in jobs if not is_complete(job, cache_root)]
    except CacheError as error:
        raise click.ClickException(str(error))
    log_path = log_path or Path(cache_root) / dataset_slug(dataset, dataset_name) / "extract.jsonl"
    if todo and not dry_run:  # before any image is read or model loaded
        try:
            device = planning_device(device, submitting) if submitting is not None else resolve_device(device)
        except DeviceError as error:
            raise click.BadParameter(str(error), param_hint="--device") from None
    bad = unreadable_images(todo)
    if bad:
        listed = "\n".join(f"  {key}: {reason}" for key, reason in list(bad.items())[:MAX_LISTED])
        if on_error == "stop":
            raise click.ClickException(
                f"{len(bad)} image(s) needed for extraction cannot be read; the first {min(len(bad), MAX_LISTED)}:"
                f"\n{listed}\nNo cache was written. Restore them, or re-run with --on-error skip to leave them out.")
        todo = drop_keys(todo, bad)
        if not any(job.ctx.keys for job in todo):
            raise click.ClickException(f"none of the images needed for extraction can be read:\n{listed}")
        say(f"skipping {len(bad)} unreadable image(s) (--on-error skip):\n{listed}")
        if rank == 0 and not dry_run and submitting is None:   # a submitted task logs it itself
            opt.require_writable(cache_root, "--cache-root")
            log(log_path, {"event": "skipped_images", "count": len(bad), "images": bad}, rank)
        todo = [job for job in todo if not is_complete(job, cache_root)]
    sizes = estimate_bytes(todo)
    total = sum(sizes.values())
    say(f"extract {dataset} ({', '.join(protocols)}, shots {','.join(map(str, shots))}, seeds "
        f"{','.join(map(str, seeds))}): {len(jobs)} job(s), {len(jobs) - len(todo)} already complete")
    for name, size in sizes.items():
        say(f"  {name:<16} up to {format_bytes(size)}")
    say(f"  total            up to {format_bytes(total)} (limit --max-bytes {format_bytes(max_bytes)})")
    if total > max_bytes:
        raise click.ClickException(
            f"the estimate {format_bytes(total)} exceeds --max-bytes {format_bytes(max_bytes)}; shrink it with "
            "--views (fewer views), --layers (e.g. 3,7,11), --token-pool 2 (7x7 grid), --dtype int8 (per-token "
            "scale), or raise --max-bytes")
    if dry_run or not todo:
        return todo, options
    opt.require_writable(cache_root, "--cache-root")  # before any model loads
    if not wait:
        _refuse_locked_caches(todo, cache_root)
    for job in todo:
        job.ctx.device = job.request.device = device
        job.request.dtype = "float16" if device.startswith("cuda") else "float32"
    if preset == "tiny" or any(job.request.tiny for job in todo):
        from pipelines.presets import register_model_configs

        register_model_configs()
    if submitting is not None:
        return todo, options
    todo = _preflight(todo, options, say)
    if not todo:
        return
    barrier = _distributed_barrier(world_size, device)
    try:
        reports = run(todo, cache_root, backend=backend, log_path=log_path, rank=rank, world_size=world_size,
                      barrier=barrier, progress=not bars.quiet() and (sys.stderr.isatty() or rank == 0),
                      keep_going=world_size == 1, wait=wait)
    finally:
        _destroy_process_group(world_size)
    failed = [report for report in reports if report.status == "failed"]
    for report in reports:
        say(f"  {report.agent:<8} {report.status:<8} rows {report.rows:>6}  {report.seconds:8.1f} s  "
            f"{report.images_per_second:8.1f} rows/s  peak RSS {format_bytes(report.peak_rss_bytes)}")
    if failed:
        raise click.ClickException("\n".join(f"agent {r.agent} failed: {r.error}" for r in failed))


def _refuse_locked_caches(jobs, cache_root) -> None:
    """Another writer holds one of these caches: stop now, before any model loads (every rank sees the same)."""
    from cache_schema.lock import current_holder, locked_message
    from extract.runner import planned_path

    held = [(path, holder) for path in dict.fromkeys(planned_path(job, cache_root) for job in jobs)
            if (holder := current_holder(path)) is not None]
    if held:
        raise click.ClickException("\n".join(locked_message(path, holder) for path, holder in held))


def _prepare_dataset(options, world_size: int, download: bool, echo):
    """Fetch what the dataset and the selected agents' texts need (images, split file, official descriptions) before
    planning; under torchrun the ranks only read (`make extract` prepares before it starts them)."""
    from extract.agents import registry
    from pipelines.datasets import get_info, prepare
    from pipelines.datasets.preparation import missing_downloads
    from pipelines.presets import resolve_agents
    from pipelines.texts import needed_descriptions

    info = get_info(options.dataset)
    files = {name: given["descriptions"] for name, given in options.agent_options.items()}
    wanted = needed_descriptions(resolve_agents(options.agents, tuple(registry())), files, options.agent_settings)
    if world_size > 1 or (info.split_path(options.data_root).exists()
                          and not missing_downloads(info, options.data_root, wanted)):
        return None
    return prepare(options.dataset, options.data_root, download=download, verify=False, descriptions=wanted,
                   echo=echo)


def _preflight(todo: list, options, say) -> list:
    """Before any extraction: download and convert published checkpoints, then load every agent that still has
    work (`agents check`), so a checkpoint that cannot load fails now, not hours in, with every problem listed.
    The tiny preset builds its agents from code, with nothing to download or verify."""
    from extract.runner import is_complete
    from pipelines.agent_check import format_result, items_from_jobs, run_checks, summary

    if options.preset == "tiny":
        say("agents check: the tiny preset builds every agent from its config (nothing to download or verify)")
        return todo
    items = items_from_jobs(todo, options)
    results = run_checks(items, options, say=say, on_result=lambda result: say(format_result(result)))
    say(summary(results))
    failed = [result for result in results if result.status == "failed"]
    if failed:
        raise click.ClickException("agents check failed, nothing was extracted:\n" +
                                   "\n".join(f"agent {result.agent} failed: {result.error}" for result in failed))
    weights = {item.spec.name: item.weights for item in items if item.downloads}  # now with the checkpoint's sha256
    for job in todo:
        job.weights = weights.get(job.spec.name, job.weights)
    return [job for job in todo if not is_complete(job, options.cache_root)]  # a pin can name a finished cache


def _destroy_process_group(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(device: str) -> str:
    import torch

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return f"cuda:{local_rank}"
    return "cpu"


def _distributed_barrier(world_size: int, device: str):
    if world_size <= 1:
        return lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.barrier

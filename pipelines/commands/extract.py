"""`transagent extract`: stage 1. Under torchrun each rank writes its own segments; rank 0 finalises."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from pipelines import options as opt
from pipelines import progress as bars
from pipelines.config import ConfigError
from pipelines.config.cli import layers, tree_options
from pipelines.config.extract import ExtractOptions
from pipelines.config.tree import build
from pipelines.devices import DeviceError
from pipelines.extract_run import ExtractError, extract_dataset, preflight
from pipelines.extraction import SizeLimitError
from pipelines.launch import LaunchError, LaunchOptions, summary
from pipelines.roots import RootNotWritable
from pipelines.submit import submit_extraction


@click.command()
@click.option("--datasets", "--dataset", "datasets", default=None, metavar="NAME[,NAME...]",
              help="Dataset name, or comma-separated names (one after another; one submission with submitit).  "
                   f"[default: {ExtractOptions.dataset}]")
@tree_options(ExtractOptions, skip=("dataset",))
@click.option("--dry-run", is_flag=True, help="Print the plan and size estimate, write nothing.")
@opt.launcher_options
@bars.quiet_option
def extract(datasets, dry_run, launcher, **params):
    """Stage 1: run each agent once and cache what it knows.

    \b
    With --launcher submitit: one job per (dataset, agent) with incomplete caches, all into the same cache root;
    the dataset preparation, the plan, the image check, the size limit and the agents' check run here first.
    """
    context = click.get_current_context()
    opt.check_launcher_flags(context, launcher)
    try:
        base = build(ExtractOptions, layers(context, ExtractOptions, skip=("dataset",)).merged())
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    names = [name.strip() for name in (datasets or base.dataset).split(",") if name.strip()]
    if not names:
        raise click.BadParameter("at least one dataset is needed", param_hint="--datasets")
    if base.dataset_name and len(names) > 1:
        raise click.BadParameter("names the directory of one folder:<dir> dataset; extract the datasets one at a "
                                 "time", param_hint="--dataset-name")
    configs = {name: dataclasses.replace(base, dataset=name) for name in names}
    if launcher == "submitit":
        return _submit(configs, dry_run, params)
    for config in configs.values():
        _call(extract_dataset, config, dry_run=dry_run, progress=not bars.quiet())


def _call(function, *args, **kwargs):
    """The library's errors as one line each (a device that is not one names the flag)."""
    try:
        return function(*args, **kwargs)
    except DeviceError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None
    except (ExtractError, SizeLimitError, RootNotWritable) as error:
        raise click.ClickException(str(error)) from None


def _submit(configs: dict[str, ExtractOptions], dry_run: bool, params: dict):
    options = LaunchOptions.from_params(params)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise click.UsageError("--launcher submitit submits from one process; run it without torchrun")
    if dry_run:   # each dataset planned as `extract --dry-run` plans it: jobs, image check, size limit
        for dataset, config in configs.items():
            for agent in dict.fromkeys(job.spec.name for job in _call(extract_dataset, config, dry_run=True)):
                click.echo(f"  task {dataset}/{agent}: transagent extract --dataset {dataset} --agents {agent}")
        return
    # Everything the in-process extraction checks before a model loads runs here: preparation (downloads), plan,
    # image check, size limit, device, a writable cache root, no other writer (unless --wait).
    planned = {dataset: _call(extract_dataset, config, submitting=options.cluster)
               for dataset, config in configs.items()}
    # Model weights must be in the Hugging Face cache the compute nodes read (tasks run with HF_HUB_OFFLINE=1):
    # the agents' preflight (`agents check`) downloads, converts and loads each agent with work here.
    plans = {dataset: _call(preflight, todo, configs[dataset]) if todo else [] for dataset, todo in planned.items()}
    if not any(plans.values()):
        click.echo("every cache is complete: nothing to submit")
        return
    cache_root = next(iter(configs.values())).cache_root
    job_dir = options.job_dir or Path(cache_root) / ".jobs"
    opt.require_writable(job_dir, "--job-dir")
    try:
        states = submit_extraction(plans, configs, options, job_dir)
    except LaunchError as error:
        raise click.ClickException(str(error)) from None
    if not options.wait:
        click.echo(f"submitted; `transagent cache ls --cache-root {cache_root}` shows the caches' status")
        return
    click.echo("\n" + summary(states))
    failed = [state for state in states if state.status in ("failed", "not run")]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(states)} extraction task(s) did not finish: "
                                   + "; ".join(f"{s.task.name} ({s.log or s.note})" for s in failed))

"""`transagent sweep`: stage 2 over a grid of (dataset, shots, seed, ablation), in-process or as N processes."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import click

from pipelines.datasets import DatasetError

from pipelines import options as opt
from pipelines import progress as bars
from pipelines.commands.distill import checked_device
from pipelines.config.cli import layers, tree_options
from pipelines.config.distill import DistillRun
from pipelines.devices import DeviceError, planning_device, resolve_device
from pipelines.launch import LaunchError, LaunchOptions
from pipelines.sweep import (CellResult, SweepError, cell_name, cell_settings, expand_grid, finished_result,
                             grid_file, is_finished, run_in_process, run_processes, summary_table)


@click.command()
@click.option("--datasets", "--dataset", "datasets", default=None, metavar="NAME[,NAME...]",
              help="Comma-separated datasets (default: the configuration's dataset).")
@tree_options(DistillRun, skip=("dataset",))
@click.option("--ablation", "ablations", multiple=True, metavar="KEY=VALUE[;KEY=VALUE]",
              help="One ablation of the grid (repeat for more): configuration keys or flag names, e.g. "
                   "'lambda_vac=0' or 'agents=dino,mae;gates.router=noisy-linear'; 'default' is the protocol's "
                   "value. It overrides the options above for its cells. Without it: one ablation, the options.")
@click.option("--grid", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Grid file, JSON or YAML: datasets, ablations and any configuration key (shots, seeds, "
                   "optim.epochs, ...); --set and the flags override it, it overrides --config.")
@click.option("--resume", is_flag=True, help="Continue interrupted cells from their last checkpoint.")
@click.option("--force", is_flag=True, help="Delete existing run directories of the cells and start over.")
@click.option("--processes", type=click.IntRange(0), default=0, show_default=True,
              help="0: cells one after another in this process; N: separate `python -m pipelines distill "
                   "--config CELL.yaml` processes, at most N at once, a log file each.")
@click.option("--gpus", default="", help="With --processes: comma-separated GPU ids handed out to the processes "
                                         "(CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Per-cell logs and configuration files (default: RUNS_ROOT/sweep-logs).")
@click.option("--dry-run", is_flag=True, help="Print the cells (and their settings) without running them.")
@opt.launcher_options
@bars.quiet_option
def sweep(datasets, ablations, grid, resume, force, processes, gpus, log_dir, dry_run, launcher, **params):
    """Stage 2 over a grid: every (dataset, shots, seed, ablation) cell; finished cells are skipped.

    \b
    transagent sweep --datasets eurosat,dtd --shots 16 --seeds 1,2,3 \\
        --ablation "agents=none" --ablation "lambda_vac=0" --ablation "agents=dino,mae;router=noisy-linear"
    transagent sweep ... --launcher submitit --slurm-partition gpu --slurm-time 4:00:00 --retries 1
    """
    context = click.get_current_context()
    opt.check_launcher_flags(context, launcher)
    submitit = launcher == "submitit"
    if submitit and (processes or gpus):
        raise click.UsageError("--processes and --gpus are for --launcher local; with submitit the scheduler "
                               "places the tasks (--slurm-gpus-per-task)")
    given = layers(context, DistillRun, skip=("dataset",))
    try:
        axes, settings = grid_file(grid) if grid else ({}, {})
        spec = {**given.file, **settings, **given.sets, **given.flags,
                "ablations": list(ablations) or axes.get("ablations"), "datasets": datasets or axes.get("datasets")}
        cells = expand_grid({key: value for key, value in spec.items() if value is not None})
    except SweepError as error:
        raise click.ClickException(str(error)) from None
    log_dir = log_dir or Path(cells[0].runs_root) / "sweep-logs"

    if dry_run:
        for number, cell in enumerate(cells, 1):
            click.echo(f"{number:>3}. {cell_name(cell)}" + ("   (finished)" if is_finished(cell) else ""))
            if processes or submitit:
                click.echo("     " + shlex.join(["transagent", "distill"] + [part for item in cell_settings(cell)
                                                                           for part in ("--set", item)]))
        click.echo(f"{len(cells)} cell(s)" + (", a job each through submitit" if submitit else
                                             f", {processes} process(es) at once" if processes else ", in-process"))
        return

    if submitit:
        results = _submit(cells, params, log_dir, resume, force)
        if results is None:
            return
    else:
        for device in sorted({cell.device for cell in cells}):
            checked_device(device)
        if processes:
            results = run_processes(cells, processes, log_dir, tuple(g.strip() for g in gpus.split(",") if g.strip()),
                                    resume=resume, force=force)
        else:
            cells = [dataclasses.replace(cell, device=resolve_device(cell.device)) for cell in cells]
            results = run_in_process(cells, log_dir, resume=resume, force=force, progress=bars.enabled())
    click.echo("\n" + summary_table(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} cell(s) failed: "
                                   + "; ".join(f"{cell_name(r.config)} ({r.log})" for r in failed))


def _submit(cells, params, log_dir, resume: bool, force: bool):
    """The cells as one submitit job array; None with --no-wait (then `transagent runs ls` follows them)."""
    from pipelines.submit import submit_sweep   # the submission side of both stages: stage 2 never imports stage 1

    options = LaunchOptions.from_params(dict(params))
    for device in sorted({cell.device for cell in cells}):   # each task checks its own on its node
        try:
            planning_device(device, options.cluster)
        except DeviceError as error:
            raise click.BadParameter(str(error), param_hint="--device") from None
    for runs_root in sorted({str(cell.runs_root) for cell in cells}):
        opt.require_writable(runs_root, "--runs-root")
    job_dir = options.job_dir or Path(log_dir) / "jobs"
    opt.require_writable(job_dir, "--job-dir")
    try:
        states = submit_sweep(cells, options, job_dir, resume=resume, force=force)
    except (LaunchError, DatasetError) as error:
        raise click.ClickException(str(error)) from None
    if not options.wait:
        click.echo(f"submitted; `transagent runs ls {cells[0].runs_root}` shows the cells and their job ids")
        return None
    return [finished_result(cell, state.status, log_path=state.log) if state.status in ("done", "exists")
            else CellResult(cell, "failed", error=state.note, log=state.log)
            for cell, state in zip(cells, states, strict=True)]

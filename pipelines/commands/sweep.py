"""`transagent sweep`: stage 2 over a grid of (dataset, shots, seed, ablation), in-process or as N processes."""
from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import click
from click.core import ParameterSource

from pipelines import options as opt
from pipelines import progress as bars
from pipelines.distillation import ABLATION_FLAGS, DistillOptions
from pipelines.launch import LAUNCH_PARAMS

DEFAULTS = DistillOptions()
NOT_OPTIONS = ("grid", "processes", "gpus", "log_dir", "dry_run", "launcher", *LAUNCH_PARAMS)   # how to run, not what



@click.command()
@click.option("--datasets", "--dataset", "datasets", default="eurosat", show_default=True,
              help="Comma-separated datasets.")
@opt.data_root
@opt.cache_root
@opt.runs_root
@opt.preset
@opt.agents
@click.option("--protocol", type=click.Choice(["base2novel", "fewshot", "cross", "dg"]), default="base2novel",
              show_default=True)
@click.option("--shots", default="16", show_default=True, help="Comma-separated shot counts, e.g. 1,2,4,8,16.")
@opt.seeds
@click.option("--ablation", "ablations", multiple=True, metavar="NAME=VALUE[;NAME=VALUE]",
              help=f"One ablation of the grid (repeat for more), over: {', '.join(ABLATION_FLAGS)}. It overrides "
                   "the flags below for its cells ('default' = distill's default). Without it: one ablation, the "
                   "flags below.")
@click.option("--lambda-vac", type=float, default=DEFAULTS.lambda_vac, show_default=True, help="Weight of L_VAC.")
@click.option("--lambda-lac", type=float, default=DEFAULTS.lambda_lac, show_default=True, help="Weight of L_LAC.")
@click.option("--lambda-rel", type=float, default=DEFAULTS.lambda_rel, show_default=True, help="Weight of L_REL.")
@click.option("--lambda-mac", type=float, default=DEFAULTS.lambda_mac, show_default=True, help="Weight of L_MAC.")
@click.option("--temperature", type=float, default=DEFAULTS.temperature, show_default=True,
              help="L_MAC temperature T.")
@click.option("--mac-student", type=click.Choice(["standardized", "logits"]), default=DEFAULTS.mac_student,
              show_default=True, help="L_MAC's student scores: standardised logits or the raw logits.")
@click.option("--router", type=click.Choice(["mlp", "noisy-linear"]), default=DEFAULTS.router, show_default=True)
@click.option("--views", type=click.IntRange(1), default=None, help="Cached views to draw from (default: all).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Default: the protocol's (20; 50 fewshot).")
@click.option("--prompt-depth", type=click.IntRange(0), default=None, help="Default: 9 (3 for cross/dg).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Loader processes building whole batches (images and teacher rows).")
@click.option("--eval-initial", is_flag=True, help="Also evaluate the prompts before training (epoch 0).")
@click.option("--resume", is_flag=True, help="Continue interrupted cells from their last checkpoint.")
@click.option("--force", is_flag=True, help="Delete existing run directories of the cells and start over.")
@opt.cache_fingerprints
@opt.report_to
@click.option("--grid", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON grid file (keys: datasets, shots, seeds, ablations and any option above, snake_case); "
                   "options given on the command line override it.")
@click.option("--processes", type=click.IntRange(0), default=0, show_default=True,
              help="0: cells one after another in this process; N: separate `python -m pipelines distill` "
                   "processes, at most N at once, a log file each.")
@click.option("--gpus", default="", help="With --processes: comma-separated GPU ids handed out to the processes "
                                         "(CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Per-cell logs (default: RUNS_ROOT/sweep-logs).")
@click.option("--dry-run", is_flag=True, help="Print the cells (and commands) without running them.")
@opt.launcher_options
@bars.quiet_option
def sweep(**params):
    """Stage 2 over a grid: every (dataset, shots, seed, ablation) cell; finished cells are skipped.

    \b
    transagent sweep --datasets eurosat,dtd --shots 16 --seeds 1,2,3 \\
        --ablation "agents=none" --ablation "lambda_vac=0" --ablation "agents=dino,mae;router=noisy-linear"
    transagent sweep ... --launcher submitit --slurm-partition gpu --slurm-time 4:00:00 --retries 1
    """
    from pipelines.sweep import (SweepError, cell_name, distill_command, expand_grid, is_finished, load_grid,
                                 run_in_process, run_processes, summary_table)

    context = click.get_current_context()
    opt.check_launcher_flags(context, params["launcher"])
    submitit = params["launcher"] == "submitit"
    if submitit and (params["processes"] or params["gpus"]):
        raise click.UsageError("--processes and --gpus are for --launcher local; with submitit the scheduler "
                               "places the tasks (--slurm-gpus-per-task)")
    spec = {name: value for name, value in params.items() if name not in NOT_OPTIONS}
    spec["ablations"] = list(spec["ablations"])
    spec["progress"] = bars.enabled()
    try:
        if params["grid"]:
            explicit = {name for name in spec if context.get_parameter_source(name) is ParameterSource.COMMANDLINE}
            spec.update({key: value for key, value in load_grid(params["grid"]).items() if key not in explicit})
        cells = expand_grid(spec)
    except SweepError as error:
        raise click.ClickException(str(error)) from None
    processes = params["processes"]
    log_dir = params["log_dir"] or Path(cells[0].runs_root) / "sweep-logs"

    if params["dry_run"]:
        for number, options in enumerate(cells, 1):
            click.echo(f"{number:>3}. {cell_name(options)}" + ("   (finished)" if is_finished(options) else ""))
            if processes:
                click.echo("     " + shlex.join(distill_command(options)))
            if submitit:
                from pipelines.launch import sweep_tasks

                click.echo("     " + shlex.join(["transagent", *sweep_tasks([options])[0].argv]))
        click.echo(f"{len(cells)} cell(s)" + (", a job each through submitit" if submitit else
                                             f", {processes} process(es) at once" if processes else ", in-process"))
        return

    if submitit:
        results = _submit(cells, params, log_dir)
        if results is None:
            return
    elif processes:
        gpus = tuple(g.strip() for g in params["gpus"].split(",") if g.strip())
        results = run_processes(cells, processes, log_dir, gpus, echo=click.echo)
    else:
        if any(options.device == "auto" for options in cells):
            from pipelines.commands.distill import _resolve_device

            device = _resolve_device("auto")
            cells = [dataclasses.replace(o, device=device) if o.device == "auto" else o for o in cells]
        results = run_in_process(cells, log_dir, echo=click.echo)
    click.echo("\n" + summary_table(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} cell(s) failed: "
                                   + "; ".join(f"{cell_name(r.options)} ({r.log})" for r in failed))


def _submit(cells, params, log_dir):
    """The cells as one submitit job array; None with --no-wait (then `transagent runs ls` follows them)."""
    from pipelines.datasets import DatasetError
    from pipelines.launch import LaunchError, LaunchOptions, submit_sweep
    from pipelines.sweep import CellResult, _finished_result

    options = LaunchOptions.from_params(dict(params))
    for device in sorted({cell.device for cell in cells} - {"auto"}):   # each task checks its own on its node
        opt.check_submitted_device(device, options.cluster)
    for runs_root in sorted({str(cell.runs_root) for cell in cells}):
        opt.require_writable(runs_root, "--runs-root")
    job_dir = options.job_dir or Path(log_dir) / "jobs"
    opt.require_writable(job_dir, "--job-dir")
    try:
        states = submit_sweep(cells, options, job_dir, echo=click.echo)
    except (LaunchError, DatasetError) as error:
        raise click.ClickException(str(error)) from None
    if not options.wait:
        click.echo(f"submitted; `transagent runs ls {cells[0].runs_root}` shows the cells and their job ids")
        return None
    results = []
    for cell, state in zip(cells, states):
        if state.status in ("done", "exists"):
            results.append(_finished_result(cell, state.status, log=state.log))
        else:
            results.append(CellResult(cell, "failed", error=state.note, log=state.log))
    return results

"""`transagent distill` (stage 2: one run per shots x seed, one after another) and `transagent evaluate RUN_DIR`."""
from __future__ import annotations

from pathlib import Path

import click

from cache_schema import CacheError
from pipelines import options as opt
from pipelines import progress as bars
from pipelines.cache_hints import explained
from pipelines.config import ConfigError
from pipelines.config.cli import layers, tree_options
from pipelines.config.distill import DistillRun, resolve
from pipelines.devices import DeviceError, resolve_device
from pipelines.distillation import distill as run_distill
from pipelines.distillation import evaluate_run


@click.command()
@tree_options(DistillRun)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Delete an existing run directory and start over.")
@click.option("--stop-after-epoch", type=click.IntRange(1), default=None, hidden=True)
@bars.quiet_option
def distill(resume, force, stop_after_epoch, **_):
    """Stage 2: train prompts + gates against the caches; evaluate the last epoch.

    Every setting has a default (distill/config.py); over it apply, in order, the protocol's file
    (pipelines/configs/<protocol>.yaml), the preset's student, --config, --set and the flags. The run writes its
    resolved configuration as <run dir>/config.yaml.
    """
    config = resolved(click.get_current_context(), DistillRun)
    opt.require_writable(config.runs_root, "--runs-root")
    for cell in config.cells():
        try:
            result = run_distill(cell, resume=resume, force=force, stop_after_epoch=stop_after_epoch,
                                 progress=bars.enabled())
        except CacheError as error:
            raise click.ClickException(explained(error)) from None
        except (ValueError, FileNotFoundError, RuntimeError) as error:
            raise click.ClickException(str(error)) from None
        click.echo(format_result(result))


def resolved(ctx: click.Context, cls=DistillRun, skip=()) -> DistillRun:
    """This command line's run configuration, its device checked before any work."""
    try:
        config = resolve(layers(ctx, cls, skip).merged())
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    checked_device(config.device)
    return config


def checked_device(device: str, usable_here: bool = True) -> str:
    try:
        return resolve_device(device, usable_here)
    except DeviceError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None


def format_result(result: dict) -> str:
    if result.get("status") == "stopped":
        return f"stopped after epoch {result['epoch']}: {result['run_dir']}"
    accuracy = result["accuracy"]
    parts = [f"{name} {value:.2f}" for name, value in accuracy.items()]
    line = f"{result['dataset']} {result['protocol']} {result['shots']}-shot seed {result['seed']}: " + \
        " | ".join(parts)
    if "initial_accuracy" in result:
        line += "   (epoch 0: " + " | ".join(f"{k} {v:.2f}" for k, v in result["initial_accuracy"].items()) + ")"
    return line + f"\n  {result['run_dir']}"


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", default=None, help="Evaluate on another dataset (cross-dataset / DG).")
@opt.data_root
@click.option("--device", default="auto", show_default=True)
def evaluate(run_dir, dataset, data_root, device):
    """Re-evaluate a trained run (its last checkpoint), e.g. on another dataset."""
    device = checked_device(device)
    try:
        result = evaluate_run(run_dir, dataset, data_root, device, progress=bars.enabled())
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{result['dataset']}: " + " | ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items()))

"""`transagent runs ls [RUNS_DIR] [--json]`: the runs under a runs root, for people, scripts and notebooks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.group()
def runs():
    """Stage-2 run directories: status, accuracies, job ids of submitted sweeps."""


@runs.command("ls")
@click.argument("runs_dir", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run instead of the table.")
def ls(runs_dir, as_json):
    """Every run under RUNS_DIR (default: $TRANSAGENT_RUNS or runs): dataset, protocol, shots, seed, ablation,
    status (done | partial | submitted | failed | unreadable), epochs trained, accuracies, job id."""
    from pipelines.runs import RunsError, list_runs, table

    runs_dir = runs_dir or Path(os.environ.get("TRANSAGENT_RUNS", "runs"))
    try:
        rows = list_runs(runs_dir)
    except RunsError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
        return
    if not rows:
        click.echo(f"no runs under {runs_dir}")
        return
    click.echo(table(rows))

"""`transagent report [RUNS_DIR]`: results tables (markdown + CSV) and plots, published numbers beside ours."""
from __future__ import annotations

import os
from pathlib import Path

import click


@click.command()
@click.argument("runs_dir", required=False, type=click.Path(path_type=Path),
                default=lambda: os.environ.get("TRANSAGENT_RUNS", "runs"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results.md, results.csv and plots/ go (default: RUNS_DIR).")
@click.option("--no-plots", is_flag=True, help="Tables only (skips matplotlib).")
@click.option("--published", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Published numbers to compare with (default: pipelines/published.json).")
def report(runs_dir, out, no_plots, published):
    """Summarise finished runs under RUNS_DIR ($TRANSAGENT_RUNS or runs): seed means ± std, HM, averages."""
    from pipelines.report import ReportError, write_report

    try:
        result = write_report(runs_dir, out, plots=not no_plots, published_path=published)
    except ReportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(result.markdown)
    plots = f" and {len(result.plots)} plot(s) in {result.plots[0].parent}" if result.plots else ""
    click.echo(f"{len(result.runs)} finished run(s), {len(result.unfinished)} unfinished; "
               f"wrote {result.markdown_path}, {result.csv_path}{plots}")

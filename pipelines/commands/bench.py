"""`transagent bench`: the performance benchmarks of DESIGN §8 -> bench/results.json and a short table."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--quick", is_flag=True, help="A reduced run (a few minutes on a 2-core CPU): fewer repetitions, "
                                             "live teachers without their own warm-up, scaling up to 1,000 rows.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench/results.json"),
              show_default=True, help="Where the JSON results go.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where scratch caches go (a temporary directory inside it, removed afterwards; needs about "
                   "2 GB). Default: the system temporary directory.")
@click.option("--device", type=click.Choice(["auto", "cpu"]), default="auto", show_default=True,
              help="auto: the CPU, then the GPU when one is present; cpu: the CPU only.")
@click.option("--plan", type=click.Choice(["full", "quick", "smoke"]), default=None, hidden=True,
              help="smoke: tiny shapes, one step of everything (the harness's own test).")
def bench(quick, output, work_dir, device, plan):
    """Time and memory of stage 2 (cached vs. student-only vs. live teachers), extraction, cache reads and cache
    growth, at ViT-B/16 shapes with random weights. Each verdict compares with the targets of DESIGN §8."""
    from pipelines.bench.run import run_bench

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    plan = plan or ("quick" if quick else "full")
    report = run_bench(plan, output, work_dir, ["cpu"] if device == "cpu" else None,
                       log=lambda line: click.echo(line, err=True))
    click.echo(report["table"])
    click.echo(f"\n{report['plan']} run: {report['seconds']:.0f} s on {report['machine']['cpu']} "
               f"({report['machine']['usable_cores']} cores); wrote {output}")

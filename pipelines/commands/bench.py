"""`transagent bench`: the performance benchmarks of DESIGN §8 -> bench/results.json and a short table."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import click


class _Echo(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@contextlib.contextmanager
def progress_to_stderr(name: str):
    """The library's progress messages (logger `name`, INFO) on stderr while the command runs."""
    logger, handler = logging.getLogger(name), _Echo()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False   # once on stderr, whatever handlers the libraries gave the root logger
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@click.command()
@click.option("--quick", is_flag=True, help="A reduced run (several minutes on a 2-core CPU): fewer rows, "
                                             "shorter epochs, no live-teacher memory process, scaling up to 1,000 "
                                             "rows.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the JSON results go. Default: bench/results.json (CPU), bench/gpu.json (GPU section).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where scratch caches go (a temporary directory inside it, removed afterwards; needs about "
                   "10 GB: the reads compare a 1,280-row cache with one file of the same rows). Default: the "
                   "system temporary directory.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="cpu: the CPU benchmarks; cuda: only the GPU section (one script that fits 10 minutes of a "
                   "lent GPU, no network); auto: the CPU benchmarks, then the GPU section when a GPU is present.")
@click.option("--wheels", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="GPU section: a directory of wheels to install missing libraries from (pip --no-index); "
                   "also TRANSAGENT_WHEELS.")
@click.option("--plan", type=click.Choice(["full", "quick", "smoke"]), default=None, hidden=True,
              help="smoke: tiny shapes, one step of everything (the harness's own test).")
def bench(quick, output, work_dir, device, wheels, plan):
    """Time and memory of stage 2 (cached vs. student-only vs. live teachers, the loader's workers), extraction,
    cache reads and cache growth, at ViT-B/16 shapes with random weights; each figure with the spread of its
    repetitions and a verdict against the targets of DESIGN §8."""
    import torch

    plan = plan or ("quick" if quick else "full")
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    with progress_to_stderr("pipelines.bench"):
        if device != "cuda":
            from pipelines.bench.run import run_bench

            out = output or Path("bench/results.json")
            report = run_bench(plan, out, work_dir)
            click.echo(report["table"])
            click.echo(f"\n{report['plan']} run: {report['seconds']:.0f} s on {report['machine']['cpu']} "
                       f"({report['machine']['usable_cores']} cores); wrote {out}")
        if gpu:
            from pipelines.bench.gpu import run_gpu

            out = output if device == "cuda" and output else Path("bench/gpu.json")
            report = run_gpu("smoke" if plan == "smoke" else "gpu", out, work_dir, "cuda", wheels)
            click.echo(report["table"])
            click.echo(f"\nwrote {out}")

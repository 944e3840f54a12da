"""Progress bars for the long steps (transfers, packing, verifying, merging, downloads, training, extraction).

Bars go to stderr, so piped stdout stays parseable; they show only when stderr is a terminal, and `--quiet`
(`transagent --quiet ...`, or the flag on the commands that draw bars) turns every one of them off. A step takes a
callback with fsspec's interface (`set_size(total)`, `relative_update(n)`), so one object serves fsspec transfers
(`TqdmCallback`) and our own loops; `NoOpCallback` when bars are off.
"""
from __future__ import annotations

import sys

import click

_quiet = False


def set_quiet(quiet: bool = True) -> None:
    global _quiet
    _quiet = bool(quiet)


def quiet() -> bool:
    return _quiet


def enabled() -> bool:
    """Draw bars? Not with --quiet, and not into a file or a pipe."""
    return not _quiet and sys.stderr.isatty()


def callback(description: str, unit: str = "B"):
    """An fsspec callback that draws a bar (bytes: scaled, 1024-based) or does nothing when bars are off."""
    from fsspec.callbacks import NoOpCallback, TqdmCallback

    if not enabled():
        return NoOpCallback()
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return TqdmCallback(tqdm_kwargs={"desc": description, "unit": unit, "file": sys.stderr, "leave": False,
                                     "dynamic_ncols": True, **scaled})


def copy(source, sink, total: int | None, description: str, chunk: int = 1 << 20) -> int:
    """Copy a file object to another with a byte bar (total None: size unknown, the bar shows the rate)."""
    progress = callback(description)
    progress.set_size(total)
    copied = 0
    try:
        while data := source.read(chunk):
            sink.write(data)
            copied += len(data)
            progress.relative_update(len(data))
    finally:
        progress.close()
    return copied


def _set_quiet(ctx, param, value):
    if value:
        set_quiet(True)


quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
                            help="No progress bars (they go to stderr, and only to a terminal).")

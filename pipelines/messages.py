"""Library messages on the command line: what our packages' loggers report, shown through click.

The library says what it downloads, pins, converts and plans through `logging`; `transagent` shows those messages
(warnings on stderr), under torchrun on rank 0 only (every rank runs the same preparation). Library users configure
logging as they like.
"""
from __future__ import annotations

import logging
import os

import click

LOGGERS = ("pipelines", "extract", "distill", "cache_schema")


class ClickHandler(logging.Handler):
    """A record's message through click.echo: INFO on stdout with the command's own lines, warnings and errors on
    stderr; the stream is looked up when written (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=record.levelno >= logging.WARNING)
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports the failure, never raises
            self.handleError(record)


def show_library_messages() -> None:
    """Show INFO and above of our loggers (WARNING and above on the ranks after the first) and other libraries'
    warnings, once each: the handler sits on the root logger, so a library that calls `logging.basicConfig` (or
    `logging.warning`, which does) adds no second copy of our lines, and pytest's caplog still sees every record."""
    level = logging.INFO if os.environ.get("RANK", "0") in ("", "0") else logging.WARNING
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    if not any(isinstance(handler, ClickHandler) for handler in root.handlers):
        root.addHandler(ClickHandler())

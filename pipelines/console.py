"""The library reports through `logging`; a command shows those messages on the console with `show_messages`."""
from __future__ import annotations

import logging

import click

PACKAGES = ("pipelines", "extract", "distill", "cache_schema")


class _Echo(logging.Handler):
    """One line per message, through click (so a test's CliRunner sees it like any other output)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


def show_messages() -> None:
    """Print this project's INFO messages and above (idempotent: one handler per package logger)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(handler, _Echo) for handler in logger.handlers):
            logger.addHandler(_Echo())

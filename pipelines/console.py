"""The library reports through `logging`; a command shows those messages on the console while it runs."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import click

PACKAGES = ("pipelines", "extract", "distill", "cache_schema")


class _Echo(logging.Handler):
    """One line per message, through click (so a test's CliRunner sees it like any other output)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def messages() -> Iterator[None]:
    """Print this project's INFO messages and above until the block ends (then the loggers are as they were)."""
    handler = _Echo()
    loggers = [logging.getLogger(name) for name in PACKAGES]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def show_messages() -> None:
    """`messages()` for the rest of the running click command."""
    click.get_current_context().with_resource(messages())

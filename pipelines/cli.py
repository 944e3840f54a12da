"""The `transagent` command. Sub-commands are imported only when used, so `--help` never imports torch.

Errors that are the user's to fix (a dataset, a cache, a checkpoint, a root that cannot be written) print one
sentence and exit 1, whichever command meets them; anything else is a bug and keeps its traceback.
"""
import errno
import functools
import importlib
from pathlib import Path

import click

# name -> "module:attribute"; each module keeps heavy imports inside its functions.
COMMANDS = {
    "extract": "pipelines.commands.extract:extract",
    "distill": "pipelines.commands.distill:distill",
    "evaluate": "pipelines.commands.distill:evaluate",
    "sweep": "pipelines.commands.sweep:sweep",
    "report": "pipelines.commands.report:report",
    "bench": "pipelines.commands.bench:bench",
    "datasets": "pipelines.commands.datasets:datasets",
    "agents": "pipelines.commands.agents:agents",
    "cache": "pipelines.commands.cache:cache",
    "runs": "pipelines.commands.runs:runs",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name, target in COMMANDS.items() if _module_exists(target))

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or not _module_exists(target):
            return None
        module_name, attribute = target.split(":")
        return with_one_line_errors(getattr(importlib.import_module(module_name), attribute))


UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _explained(error: Exception) -> str:
    """A cache error's message with the command that fixes it (cache_schema names none)."""
    from cache_schema.errors import CacheError
    from pipelines.cache_hints import explained

    return explained(error) if isinstance(error, CacheError) else str(error)


def _user_errors() -> tuple[type[BaseException], ...]:
    from cache_schema.errors import CacheError
    from distill.checkpoints import CheckpointError
    from pipelines.datasets.errors import DatasetError

    return CacheError, CheckpointError, DatasetError


def with_one_line_errors(command: click.Command) -> click.Command:
    """Wrap a command's (or a group's commands') callbacks so that user errors become a one-line ClickException."""
    if getattr(command, "_one_line_errors", False):
        return command
    command._one_line_errors = True
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_one_line_errors(sub)
    elif command.callback is not None:
        command.callback = _translated(command.callback)
    return command


def _translated(callback):
    @functools.wraps(callback)
    def run(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except click.ClickException:
            raise
        except OSError as error:
            if error.errno not in UNWRITABLE:
                raise
            raise click.ClickException(_unwritable(error)) from None
        except Exception as error:  # noqa: BLE001 - only the user's errors are translated, the rest re-raised
            if not isinstance(error, _user_errors()):
                raise
            raise click.ClickException(_explained(error)) from None
    return run


def _unwritable(error: OSError) -> str:
    """'cannot write FILE: REASON (under --flag ROOT)': the flag whose path holds the file, when one does."""
    where = ""
    context = click.get_current_context(silent=True)
    if error.filename is not None and context is not None:
        target = Path(error.filename).absolute()
        for param in context.command.params:
            value = context.params.get(param.name)
            if isinstance(value, Path) and (target == value.absolute() or value.absolute() in target.parents):
                where = f" (under {param.opts[0] if param.opts[0].startswith('-') else param.human_readable_name} "
                where += f"{value})"
                break
    name = f" {error.filename}" if error.filename is not None else ""
    return f"cannot write{name}: {error.strerror or error}{where}"


def _module_exists(target):
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they go to stderr, and only to a terminal).")
def main(quiet):
    """TransAgent-Cache: extract teacher knowledge once, distill CLIP prompts many times."""
    from pipelines.messages import show_library_messages
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    show_library_messages()

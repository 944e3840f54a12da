"""The `transagent` command. Sub-commands are imported only when used, so `--help` never imports torch."""
import importlib

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
        return getattr(importlib.import_module(module_name), attribute)


def _module_exists(target):
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars (they go to stderr, and only to a terminal).")
def main(quiet):
    """TransAgent-Cache: extract teacher knowledge once, distill CLIP prompts many times."""
    from pipelines.progress import set_quiet

    set_quiet(quiet)

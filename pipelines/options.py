"""Options shared by several sub-commands: one spelling, one meaning, one default."""
from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from pipelines import roots
from pipelines.config import common
from pipelines.config.cli import plain_option
from pipelines.config.extract import ExtractOptions, agent_settings
from pipelines.launch import CLUSTERS, LAUNCH_PARAMS, LAUNCHERS, LaunchError, parse_time


@dataclass(frozen=True)
class SharedSettings:
    """The run-level settings commands without a configuration take too (`datasets`, `agents`, `cache`)."""

    preset: str = common.preset()
    agents: str = common.agents()
    shots: tuple[int, ...] = common.shots("Training images per class, e.g. 16 or 1,2,4,8,16.")
    seeds: tuple[int, ...] = common.seeds()
    data_root: Path = common.data_root()
    cache_root: Path = common.cache_root()
    runs_root: Path = common.runs_root()


data_root = plain_option(SharedSettings, "data_root")
cache_root = plain_option(SharedSettings, "cache_root")
runs_root = plain_option(SharedSettings, "runs_root")
preset = plain_option(SharedSettings, "preset")
agents = plain_option(SharedSettings, "agents")
shots = plain_option(SharedSettings, "shots")
seeds = plain_option(SharedSettings, "seeds")
extract_protocol = plain_option(ExtractOptions, "protocol")
wait = plain_option(ExtractOptions, "wait")


def parse_agent_pairs(ctx, param, values) -> dict[str, str]:
    """Repeated NAME=VALUE flags (`agents check --agent-path`, --slurm-option) -> {name: value}."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected AGENT=VALUE, got {value!r}")
        pairs[name.strip()] = rest.strip()
    return pairs


def parse_agent_settings(ctx, param, values) -> dict[str, dict]:
    """Repeated AGENT:KEY=VALUE flags (--agent-option) -> {agent: {key: value}} (`config.extract.agent_settings`)."""
    try:
        return agent_settings(values)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def require_writable(directory, flag: str) -> None:
    """Fail before any work when a root cannot be written (read-only mount, no permission, full disk)."""
    try:
        roots.require_writable(directory, flag)
    except roots.RootNotWritable as error:
        raise click.ClickException(str(error)) from None


def _parse_minutes(ctx, param, value):
    try:
        parse_time(value)
    except LaunchError as error:
        raise click.BadParameter(str(error)) from None
    return value


_LAUNCHER_OPTIONS = [
    click.option("--launcher", type=click.Choice(LAUNCHERS), default="local", show_default=True,
                 help="local: on this machine; submitit: one job per task through submitit (SLURM, or its local "
                      "executor), from this node."),
    click.option("--cluster", type=click.Choice(CLUSTERS), default="auto", show_default=True,
                 help="With --launcher submitit: SLURM, submitit's local executor (one machine, no scheduler), or "
                      "auto (SLURM where sbatch exists)."),
    click.option("--slurm-partition", default=None, help="SLURM partition."),
    click.option("--slurm-account", default=None, help="SLURM account."),
    click.option("--slurm-qos", default=None, help="SLURM quality of service."),
    click.option("--slurm-gpus-per-task", type=click.IntRange(0), default=1, show_default=True),
    click.option("--slurm-cpus-per-task", type=click.IntRange(1), default=None),
    click.option("--slurm-mem-gb", type=click.FloatRange(0, min_open=True), default=None, help="Memory per task."),
    click.option("--slurm-time", default="12:00:00", show_default=True, callback=_parse_minutes,
                 help="Time limit per task: minutes or [D-]HH:MM[:SS]."),
    click.option("--slurm-array-parallelism", type=click.IntRange(1), default=None,
                 help="At most this many tasks of the array at once."),
    click.option("--slurm-setup", multiple=True, metavar="LINE",
                 help="Shell line run before each task (repeat), e.g. 'source /shared/venv/bin/activate'."),
    click.option("--slurm-option", multiple=True, callback=parse_agent_pairs, metavar="KEY=VALUE",
                 help="Any other sbatch option (repeat), e.g. constraint=a100."),
    click.option("--retries", type=click.IntRange(0), default=0, show_default=True,
                 help="Re-submit a task whose job ended without finishing this many times (it resumes)."),
    click.option("--no-wait", "no_wait", is_flag=True,
                 help="Return once submitted instead of following the jobs to the end (`transagent runs ls` shows "
                      "them)."),
    click.option("--job-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="submitit's folder: job scripts, logs (<job id>_0_log.out/.err), its pickles."),
    click.option("--poll-seconds", type=click.FloatRange(0), default=10.0, hidden=True),
]


def launcher_options(function):
    """--launcher and the scheduler's flags, shared by `sweep` and `extract`."""
    for decorator in reversed(_LAUNCHER_OPTIONS):
        function = decorator(function)
    return function


def check_launcher_flags(ctx, launcher: str) -> None:
    """Scheduler flags given without --launcher submitit would be silently ignored: refuse them."""
    if launcher == "submitit":
        return
    given = [name for name in LAUNCH_PARAMS if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"{flags} only apply with --launcher submitit")

"""Options shared by several sub-commands: one spelling, one meaning, one default."""
import os
from pathlib import Path

import click


def _path_option(flag, env, default, help_text):
    return click.option(flag, type=click.Path(path_type=Path), default=lambda: os.environ.get(env, default),
                        show_default=f"${env} or {default}", help=help_text)


dataset = click.option("--dataset", default="eurosat", show_default=True, help="Dataset name (`transagent datasets ls`).")
data_root = _path_option("--data-root", "TRANSAGENT_DATA", "data", "Root holding the datasets.")
cache_root = _path_option("--cache-root", "TRANSAGENT_CACHE", "cache", "Root holding teacher caches.")
runs_root = _path_option("--runs-root", "TRANSAGENT_RUNS", "runs", "Root holding distillation runs.")
preset = click.option("--preset", type=click.Choice(["paper", "tiny"]), default="paper", show_default=True,
                      help="Model zoo: the paper's models, or tiny random models that run offline on CPU.")
agents = click.option("--agents", default="all", show_default=True,
                      help="Comma-separated agent subset of the preset, 'all', or 'none'.")
protocol = click.option("--protocol", type=click.Choice(["base2novel", "fewshot", "cross", "dg", "all"]),
                        default="base2novel", show_default=True)
shots = click.option("--shots", type=int, default=16, show_default=True, help="Training images per class.")


def _parse_seeds(ctx, param, value):
    try:
        seeds = [int(s) for s in str(value).replace(" ", ",").split(",") if s]
    except ValueError:
        raise click.BadParameter(f"expected integers like '1,2,3', got {value!r}")
    if not seeds:
        raise click.BadParameter("at least one seed is needed")
    return seeds


seeds = click.option("--seeds", default="1", show_default=True, callback=_parse_seeds,
                     help="Comma-separated seeds, e.g. 1,2,3.")


def parse_agent_pairs(ctx, param, values) -> dict[str, str]:
    """Repeated AGENT=VALUE flags (--agent-path, --descriptions, --cache-fingerprint) -> {agent: value}."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected AGENT=VALUE, got {value!r}")
        pairs[name.strip()] = rest.strip()
    return pairs


cache_fingerprints = click.option("--cache-fingerprint", "pins", multiple=True, callback=parse_agent_pairs,
                                  help="AGENT=FINGERPRINT: use this cache when several match.")


def _parse_report_to(ctx, param, value):
    from pipelines.tracking import TrackingError, parse_report_to

    try:
        return ",".join(parse_report_to(value))
    except TrackingError as error:
        raise click.BadParameter(str(error))


report_to = click.option("--report-to", default="", metavar="tensorboard[,wandb]", callback=_parse_report_to,
                         help="Also send metrics.jsonl's records, the accuracies and the configuration to these "
                              "trackers (TensorBoard: <run dir>/tensorboard/; wandb is an extra).")


def _parse_minutes(ctx, param, value):
    from pipelines.launch import LaunchError, parse_time

    try:
        parse_time(value)
    except LaunchError as error:
        raise click.BadParameter(str(error))
    return value


_LAUNCHER_OPTIONS = [
    click.option("--launcher", type=click.Choice(["local", "submitit"]), default="local", show_default=True,
                 help="local: on this machine; submitit: one job per task through submitit (SLURM, or its local "
                      "executor), from this node."),
    click.option("--cluster", type=click.Choice(["auto", "slurm", "local"]), default="auto", show_default=True,
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
    click.option("--wait/--no-wait", default=True, show_default=True,
                 help="Follow the jobs to the end, or return once submitted (`transagent runs ls` shows them)."),
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
    from click.core import ParameterSource

    if launcher == "submitit":
        return
    from pipelines.launch import LAUNCH_PARAMS

    given = [name for name in LAUNCH_PARAMS if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"{flags} only apply with --launcher submitit")

"""Options shared by several sub-commands: one spelling, one meaning, one default."""
import json
import os
import tempfile
from pathlib import Path

import click


def _path_option(flag, env, default, help_text):
    return click.option(flag, type=click.Path(path_type=Path), default=lambda: os.environ.get(env, default),
                        show_default=f"${env} or {default}", help=help_text)


dataset = click.option("--dataset", default="eurosat", show_default=True, help="Dataset name (`transagent datasets ls`).")
dataset_name = click.option("--dataset-name", default=None,
                            help="Directory name of a folder:<dir> dataset's caches and runs (default: "
                                 "folder-<last part of dir>); tells apart two folders named alike.")
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


def parse_agent_settings(ctx, param, values) -> dict[str, dict]:
    """Repeated AGENT:KEY=VALUE flags (--agent-option) -> {agent: {key: value}}; a VALUE that reads as JSON (5,
    true, ["a", "b"]) is that value, anything else the string itself."""
    settings: dict[str, dict] = {}
    for value in values:
        head, sep, raw = value.partition("=")
        agent, colon, key = head.partition(":")
        if not sep or not colon or not agent.strip() or not key.strip():
            raise click.BadParameter(f"expected AGENT:KEY=VALUE (e.g. vicuna:descriptions=generate), got {value!r}")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw.strip()
        settings.setdefault(agent.strip(), {})[key.strip()] = parsed
    return settings


cache_fingerprints = click.option("--cache-fingerprint", "pins", multiple=True, callback=parse_agent_pairs,
                                  help="AGENT=FINGERPRINT: use this cache when several match.")


def _parse_wait(ctx, param, value):
    if value != value:  # nan
        raise click.BadParameter("expected a number of seconds, got nan")
    return value


wait = click.option("--wait", type=click.FloatRange(min=0), default=0, show_default=True, callback=_parse_wait,
                    metavar="SECONDS", help="If another process is writing a cache: wait up to this long for it "
                    "(default: stop at once, naming it).")


def check_device(device: str, flag: str = "--device") -> str:
    """A device torch can use here, or a one-line error naming the flag (before any model is built)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{device!r} is not a device; use cpu, cuda, cuda:N or auto", param_hint=flag)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter(f"{device!r}: torch sees no CUDA GPU on this machine; use cpu or auto",
                                     param_hint=flag)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                                     param_hint=flag)
    return device


def check_submitted_device(device: str, cluster: str, flag: str = "--device") -> str:
    """The device a submitting node checks with: with --cluster local the tasks run here, so `device` must be
    usable here; a login node often has no GPU, so otherwise a device that parses is enough (its task checks it
    again on its node) and this node's own device (cuda or cpu) is returned."""
    if cluster == "local":
        return check_device(device, flag)
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{device!r} is not a device; use cpu, cuda, cuda:N or auto", param_hint=flag)
    try:
        return check_device(device, flag)
    except click.BadParameter:
        return "cuda" if torch.cuda.is_available() else "cpu"


def require_writable(directory, flag: str) -> None:
    """Fail before any work when a root cannot be written (read-only mount, no permission, full disk)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise click.ClickException(f"{flag} {directory} is not writable ({reason}); nothing was written. Choose "
                                   f"another {flag}, or make it writable") from None


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
    from click.core import ParameterSource

    if launcher == "submitit":
        return
    from pipelines.launch import LAUNCH_PARAMS

    given = [name for name in LAUNCH_PARAMS if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"{flags} only apply with --launcher submitit")

"""Run-level settings both stages have (dataset, preset, agents, shots, seeds, roots, device): each is written
once here, as a function returning its field, and used by the stage-1 and stage-2 trees."""
from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path

from distill.config import setting
from pipelines.presets import PRESETS


def _nonempty(values: tuple) -> tuple:
    if not values:
        raise ValueError("at least one value is needed")
    return values


def _env_path(env: str, default: str):
    return lambda: Path(os.environ.get(env, default))


def path_setting(flag: str, env: str, default: str, help_text: str):
    """A root directory: the environment variable's value, else `default` (read when a configuration is made)."""
    return field(default_factory=_env_path(env, default),
                 metadata={"help": help_text, "flag": flag, "show_default": f"${env} or {default}"})


def dataset(flag="--dataset", help_text="Dataset name (`transagent datasets ls`)."):
    return setting("eurosat", help_text, flag=flag)


def dataset_name():
    return setting(None, "Directory name of a folder:<dir> dataset's caches and runs (default: folder-<last part "
                         "of dir>); tells apart two folders named alike.", flag="--dataset-name")


def preset():
    return setting("paper", "Model zoo: the paper's models, or tiny random models that run offline on CPU.",
                   flag="--preset", choices=tuple(PRESETS))


def agents():
    return setting("all", "Comma-separated agent subset of the preset, 'all', or 'none'.", flag="--agents")


def shots(help_text: str):
    return setting((16,), help_text, flag="--shots", check=_nonempty, metavar="K[,K...]")


def seeds():
    return setting((1,), "Comma-separated seeds, e.g. 1,2,3.", flag="--seeds", check=_nonempty, metavar="S[,S...]")


def data_root():
    return path_setting("--data-root", "TRANSAGENT_DATA", "data", "Root holding the datasets.")


def cache_root():
    return path_setting("--cache-root", "TRANSAGENT_CACHE", "cache", "Root holding teacher caches.")


def runs_root():
    return path_setting("--runs-root", "TRANSAGENT_RUNS", "runs", "Root holding distillation runs.")


def device(help_text="cpu, cuda, cuda:N, or auto (a GPU when there is one)."):
    return setting("auto", help_text, flag="--device")

"""Stage 2's run configuration: the method's tree (`distill.config.DistillConfig`) plus what a run trains on and
where it reads and writes.

Resolution, lowest first: the fields' defaults; the protocol's shipped file (`configs/<protocol>.yaml`: fewshot's
epochs, cross's and dg's prompt depth); the preset (its student, and prompt depths capped at that student's
blocks); then the user's layers: the --config file, the --set assignments, the flags.

A run directory is named `<readable>-<hash>`: the readable part lists the method settings that differ from the
protocol's and preset's (`default` when none do); the hash covers every setting that can change a number (all
but the roots, device, worker count and trackers), so two runs differing in anything that matters never share a
directory, and a changed default gives a new one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import DistillConfig, setting
from pipelines.config import common
from pipelines.config.files import read_config
from pipelines.config.tree import build, flatten, leaves, nested, plain
from pipelines.presets import student_spec
from pipelines.protocols import ALIASES, PROTOCOLS
from pipelines.tracking import TrackingError, parse_report_to

# Settings that never change a number: where files are, what computes them, who is told.
NOT_IDENTITY = ("data_root", "cache_root", "runs_root", "device", "workers", "report_to")
# ... and the dataset's identity, which the directory's first part holds as its slug (a folder dataset's spec is
# a path).
IN_PATH = ("dataset", "dataset_name")
ROOTS = ("data_root", "cache_root", "runs_root")
READABLE_MAX = 60
DIGEST_CHARS = 10


def _report_to(value: str) -> str:
    try:
        return ",".join(parse_report_to(value))
    except TrackingError as error:
        raise ValueError(str(error)) from None


@dataclass(frozen=True)
class DistillRun(DistillConfig):
    """A stage-2 run (or, with several shots or seeds, one per pair): `cells()` gives them one by one."""

    dataset: str = common.dataset()
    dataset_name: str | None = common.dataset_name()
    protocol: str = setting("base2novel", "Protocol (base2new = base2novel); its settings: configs/<protocol>.yaml.",
                            flag="--protocol", choices=PROTOCOLS, aliases=ALIASES)
    shots: tuple[int, ...] = common.shots("Training images per class; a comma list trains each count.")
    seeds: tuple[int, ...] = common.seeds()
    preset: str = common.preset()
    agents: str = common.agents()
    views: int | None = setting(None, "Cached views to draw from (default: all).", flag="--views", min=1)
    layers: tuple[int, ...] | None = setting(
        None, "0-based agent layers distilled by L_VAC, numbered as extract --layers numbers them, e.g. 3,7,11; a "
              "subset of the layers the vision caches store (default: all they store).", flag="--layers",
        aliases={"all": None}, sorted=True)
    pins: dict[str, str] = field(default_factory=dict, metadata={
        "help": "AGENT=FINGERPRINT: use this cache when several match.", "flag": "--cache-fingerprint",
        "multiple": True, "metavar": "AGENT=FINGERPRINT"})
    eval_initial: bool = setting(False, "Also evaluate the prompts before training (epoch 0).",
                                 flag="--eval-initial", short="eval0")
    data_root: Path = common.data_root()
    cache_root: Path = common.cache_root()
    runs_root: Path = common.runs_root()
    device: str = common.device()
    workers: int = setting(0, "Loader processes building whole batches (images and teacher rows).", flag="--workers",
                           min=0)
    report_to: str = setting("", "Also send metrics.jsonl's records, the accuracies and the configuration to these "
                                 "trackers (TensorBoard: <run dir>/tensorboard/; wandb is an extra).",
                             flag="--report-to", check=_report_to, metavar="tensorboard[,wandb]")

    @property
    def shot(self) -> int:
        return _single(self.shots, "shots")

    @property
    def seed(self) -> int:
        return _single(self.seeds, "seeds")

    def cells(self) -> list["DistillRun"]:
        """One configuration per (shots, seed), shots outermost."""
        return [dataclasses.replace(self, shots=(shots,), seeds=(seed,)) for shots in self.shots
                for seed in self.seeds]


def _single(values: tuple[int, ...], name: str) -> int:
    if len(values) != 1:
        raise ValueError(f"{name} {','.join(map(str, values))}: one run takes one value (`cells()` splits them)")
    return values[0]


def baseline(protocol: str, preset: str) -> dict[str, object]:
    """What the protocol's shipped file and the preset set, over the fields' defaults ({dotted key: value})."""
    values = read_config(DistillRun, protocol)
    spec = student_spec(preset)
    values.update({"student.model": spec.model, "student.pretrained": spec.pretrained})
    for key in ("prompts.depth_vision", "prompts.depth_text"):
        values[key] = min(values.get(key, leaves(DistillRun)[key].field.default), spec.layers)
    return values


def resolve(user: dict[str, object]) -> DistillRun:
    """The run configuration of the user's settings ({dotted key: typed value}: file < --set < flags, merged)."""
    protocol = user.get("protocol", DistillRun.protocol)
    preset = user.get("preset", DistillRun.preset)
    return build(DistillRun, {**baseline(protocol, preset), **user})


def identity(config: DistillRun) -> dict[str, object]:
    """Every setting that can change a number of the run, as plain values."""
    return {key: plain(value) for key, value in flatten(config).items() if key not in NOT_IDENTITY + IN_PATH}


def digest(config: DistillRun) -> str:
    text = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def readable(config: DistillRun) -> str:
    """The method settings (and agents, views, layers) that differ from the protocol's and preset's, short."""
    reference = flatten(build(DistillRun, baseline(config.protocol, config.preset)))
    shown = {"agents", "views", "layers", *leaves(DistillConfig)}
    parts = [f"{leaves(DistillRun)[key].meta.get('short', key.rsplit('.', 1)[-1])}-{_short(value)}"
             for key, value in flatten(config).items() if key in shown and value != reference[key]]
    return "_".join(parts)[:READABLE_MAX] or "default"


def _short(value) -> str:
    value = plain(value)
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "", text.replace(",", "+").replace("/", "-")) or "none"


def run_name(config: DistillRun) -> str:
    """`<readable>-<hash>`: the last part of the run directory."""
    return f"{readable(config)}-{digest(config)}"


def is_run_name(name: str) -> bool:
    """A directory name this code makes (earlier versions' names had no hash, or a 6-digit one)."""
    return re.fullmatch(rf".+-[0-9a-f]{{{DIGEST_CHARS}}}", name) is not None


def absolute_roots(config: DistillRun) -> DistillRun:
    return dataclasses.replace(config, **{name: Path(getattr(config, name)).absolute() for name in ROOTS})


def as_yaml(config: DistillRun) -> dict:
    """config.yaml's content: the run's own settings first, then the method's, roots made absolute."""
    values = nested(absolute_roots(config))
    method = [f.name for f in dataclasses.fields(DistillConfig)]
    return {**{k: v for k, v in values.items() if k not in method}, **{k: values[k] for k in method}}

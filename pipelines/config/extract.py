"""Stage 1's configuration: one dataset's extraction, every setting with its default (the `extract` command makes
one per --datasets entry; a submitted task runs one dataset and one agent from its own file)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cache_schema.backends import BACKENDS
from distill.config import setting
from pipelines.config import common

EXTRACT_PROTOCOLS = ("base2novel", "fewshot")   # whose training images differ (cross and dg train like fewshot)
STORED_DTYPES = ("float16", "float32", "int8")  # int8: a scale per token


def _positive(value: float) -> float:
    if not value > 0:   # also refuses nan, which compares false with everything and so would mean "no limit"
        raise ValueError(f"expected a positive number of bytes like 50e9 (or inf for no limit), got {value}")
    return value


def _layers(layers):
    if layers is not None and any(layer < 0 for layer in layers):
        raise ValueError("layer indices are 0-based and non-negative")
    return layers


def agent_settings(values) -> dict[str, dict]:
    """Repeated AGENT:KEY=VALUE flags (--agent-option) -> {agent: {key: value}}; a VALUE that reads as JSON (5,
    true, ["a", "b"]) is that value, anything else the string itself."""
    settings: dict[str, dict] = {}
    for value in values:
        head, sep, raw = value.partition("=")
        agent, colon, key = head.partition(":")
        if not sep or not colon or not agent.strip() or not key.strip():
            raise ValueError(f"expected AGENT:KEY=VALUE (e.g. vicuna:descriptions=generate), got {value!r}")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw.strip()
        settings.setdefault(agent.strip(), {})[key.strip()] = parsed
    return settings


def _pairs(help_text: str, flag: str, metavar: str):
    return field(default_factory=dict, metadata={"help": help_text, "flag": flag, "multiple": True,
                                                 "metavar": metavar})


@dataclass(frozen=True)
class ExtractOptions:
    dataset: str = common.dataset()
    dataset_name: str | None = common.dataset_name()
    data_root: Path = common.data_root()
    cache_root: Path = common.cache_root()
    preset: str = common.preset()
    agents: str = common.agents()
    protocol: str = setting("base2novel", "Which training images to cache: base classes, all classes, or both.",
                            flag="--protocol", choices=(*EXTRACT_PROTOCOLS, "all"))
    shots: tuple[int, ...] = common.shots("Shots, e.g. 16 or 1,2,4,8,16.")
    seeds: tuple[int, ...] = common.seeds()
    split: str = setting("train", "The split whose images are cached.", flag="--split", choices=("train",))
    views: int = setting(4, "Views per training image for vision agents (view 0 = un-augmented).", flag="--views",
                         min=1)
    view_seed: int = setting(0, "Seed of the augmented views.", flag="--view-seed")
    layers: tuple[int, ...] | None = setting(None, "0-based agent layers to keep, or 'all'.", flag="--layers",
                                             aliases={"all": None}, sorted=True, check=_layers, show_default="all")
    token_pool: int = setting(1, "2 = average 2x2 tokens (14x14 -> 7x7 grid).", flag="--token-pool", choices=(1, 2))
    dtype: str = setting("float16", "How vision tokens are stored.", flag="--dtype", choices=STORED_DTYPES)
    max_bytes: float = setting(50e9, "Refuse to write more than this.", flag="--max-bytes", check=_positive)
    batch_size: int = setting(16, "Images per forward pass.", flag="--batch-size", min=1)
    device: str = common.device()
    backend: str = setting("zarr", "Cache storage.", flag="--backend", choices=BACKENDS)
    agent_paths: dict[str, str] = _pairs("AGENT=PATH: load an agent from a local directory (shikra needs one, else it "
                                         "is skipped; vitdet and mae are otherwise downloaded and converted).",
                                         "--agent-path", "AGENT=PATH")
    descriptions: dict[str, str] = _pairs("AGENT=FILE: class descriptions JSON for gpt3 or vicuna, instead of the "
                                          "official file that `datasets prepare` fetches (e.g. "
                                          "gpt3=gpt3_eurosat.json).", "--descriptions", "AGENT=FILE")
    agent_settings: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "AGENT:KEY=VALUE, e.g. vicuna:descriptions=generate, sd:conditioning=template, pixart:template=coop "
                "(README, Agents).", "flag": "--agent-option", "multiple": agent_settings,
        "metavar": "AGENT:KEY=VALUE"})
    log: Path | None = setting(None, "JSON-lines log (default: <cache-root>/<dataset>/extract.jsonl).", flag="--log")
    on_error: str = setting("stop", "A needed image is missing or unreadable: stop before any model loads, or leave it "
                                    "out (listed in the log and in the cache manifest).", flag="--on-error",
                            choices=("stop", "skip"))
    strict: bool = setting(False, "An agent that would be skipped (e.g. shikra without --agent-path) is an error.",
                           flag="--strict")
    wait: float = setting(0.0, "If another process is writing a cache: wait up to this long for it (default: stop "
                               "at once, naming it).", flag="--wait", min=0, metavar="SECONDS")

    @property
    def protocols(self) -> tuple[str, ...]:
        return EXTRACT_PROTOCOLS if self.protocol == "all" else (self.protocol,)

"""Configuration files: the paper's settings shipped as package data (`pipelines/configs/<protocol>.yaml`), a
user's YAML file, and the resolved `config.yaml` a run writes.

A file may come from anyone, so it is read with `yaml.safe_load` only (plain values, never objects) and every key
and value is checked against the tree (`tree.from_mapping`); an error names the file and the key.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from pipelines.config.tree import ConfigError, from_mapping
from pipelines.protocols import ALIASES as NAME_ALIASES

SHIPPED = "configs"                    # package data of `pipelines`: one file per protocol
MAX_BYTES = 1 << 20                    # a configuration is a few hundred bytes; refuse anything far larger


def shipped_names() -> list[str]:
    folder = resources.files("pipelines") / SHIPPED
    return sorted(entry.name[:-len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def shipped_text(name: str) -> str | None:
    """The text of a shipped configuration (base2new = base2novel), or None if there is none of that name."""
    entry = resources.files("pipelines") / SHIPPED / f"{NAME_ALIASES.get(name, name)}.yaml"
    return entry.read_text(encoding="utf-8") if entry.is_file() else None


def read_config(cls, name_or_path: str) -> dict[str, object]:
    """{dotted key: typed value} of a file, or of a shipped configuration by name (a path that exists wins)."""
    path = Path(name_or_path)
    if path.is_file():
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a configuration file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        return parse_config(cls, text, str(path))
    text = shipped_text(name_or_path)
    if text is None:
        raise ConfigError(f"--config {name_or_path}: no such file, and no shipped configuration of that name "
                          f"(shipped: {', '.join(shipped_names() + sorted(NAME_ALIASES))})")
    return parse_config(cls, text, f"configs/{NAME_ALIASES.get(name_or_path, name_or_path)}.yaml")


def parse_config(cls, text: str, where: str) -> dict[str, object]:
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{where}{at}: not valid YAML ({problem})") from None
    return from_mapping(cls, mapping if mapping is not None else {}, f"{where}: ")


def write_config(path: Path, mapping: dict, header: str) -> None:
    """A resolved configuration as YAML (atomically: a reader never sees half a file)."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False, allow_unicode=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)

"""Checkpoint converters for agents whose published weights are not in transformers format.

Every module here defines `convert(source, output, **options) -> Path`, reading the published checkpoint and
writing a transformers-format directory (config.json + safetensors) that the agent then loads as a local path.
`transagent agents convert NAME SOURCE OUTPUT` dispatches on the module name. Converters are named without being
imported (they import torch and transformers); only the one asked for is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable


def converter_names() -> list[str]:
    """The agents with a converter (the module names), sorted."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__) if not module.name.startswith("_"))


def get_converter(name: str) -> Callable:
    if name not in converter_names():
        raise KeyError(f"no converter for {name!r}; known: {', '.join(converter_names()) or '(none)'}")
    return importlib.import_module(f"{__name__}.{name}").convert

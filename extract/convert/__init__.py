"""Checkpoint converters for agents whose published weights are not in transformers format.

Every module here defines `convert(source, output, **options) -> Path`, reading the published checkpoint and
writing a transformers-format directory (config.json + safetensors) that the agent then loads as a local path.
`transagent agents convert NAME SOURCE OUTPUT` dispatches on the module name.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable


def converters() -> dict[str, Callable]:
    found = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        if callable(getattr(module, "convert", None)):
            found[module_info.name] = module.convert
    return dict(sorted(found.items()))


def get_converter(name: str) -> Callable:
    found = converters()
    if name not in found:
        raise KeyError(f"no converter for {name!r}; known: {', '.join(found) or '(none)'}")
    return found[name]

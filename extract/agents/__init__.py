"""The agent registry: every module in this package that defines `SPEC` is an agent."""
from __future__ import annotations

import importlib
import pkgutil

from extract.agents.base import AgentSpec, LoadRequest, Source

_NOT_AGENTS = {"base"}
_REGISTRY: dict[str, AgentSpec] | None = None


def registry() -> dict[str, AgentSpec]:
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for module_info in pkgutil.iter_modules(__path__):
            if module_info.name in _NOT_AGENTS or module_info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{module_info.name}")
            spec = getattr(module, "SPEC", None)
            if isinstance(spec, AgentSpec):
                found[spec.name] = spec
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def get_agent(name: str) -> AgentSpec:
    agents = registry()
    if name not in agents:
        raise KeyError(f"unknown agent {name!r}; known agents: {', '.join(agents) or '(none)'}")
    return agents[name]


__all__ = ["AgentSpec", "LoadRequest", "Source", "registry", "get_agent"]

"""Loading real weights strictly and building tiny random models reproducibly.

Real weights load strictly: a checkpoint whose keys do not fit the model beyond the agent's documented allowance
is refused (no layer silently left random), with an error that names the offline routes. Tiny random models are
built from a seed without disturbing the caller's RNG. Agents, converters and families use these; the module
imports only `extract.hub` of the package, and torch inside functions (the agent registry is imported at CLI
start-up).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
from dataclasses import dataclass, field

from extract.hub import Source, files_directory, hub_commit, hub_offline, offline_help

FIRST_KEYS = 5  # keys named in a refusal
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class KeyAllowance:
    """Checkpoint keys an agent may load without (`missing`) or leave unused (`unexpected`): fnmatch patterns over
    the key names the loader reports, and why. Any other missing or unexpected key refuses the load."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    reason: str = ""

    def allows(self, kind: str, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in getattr(self, kind))


class WeightsMismatch(ValueError):
    """A checkpoint whose keys do not fit the model beyond the agent's documented allowance."""


@dataclass
class LoadedWeights:
    """One model loaded from real weights: what `agents check` reports and hashes."""

    agent: str
    model: str                     # the class loaded, e.g. "ViTModel"
    source: str                    # Source.describe()
    subfolder: str | None
    directory: str | None          # the files' directory (local, or the hub cache snapshot), None if unknown
    commit: str | None             # the hub commit the files resolved to; None for local paths
    missing: list[str] = field(default_factory=list)      # allowed missing keys that were missing
    unexpected: list[str] = field(default_factory=list)   # allowed unexpected keys that were present


_RECORDERS: list[list[LoadedWeights]] = []


@contextlib.contextmanager
def recording():
    """Collect a `LoadedWeights` for every model `load_model` loads inside the block."""
    records: list[LoadedWeights] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


def from_pretrained(loader, source: Source, agent: str, **kwargs):
    """`loader(location, **kwargs)` (a tokenizer's or config's `from_pretrained`) for a local path or a hub id at
    its pinned revision. Hub failures are re-raised naming the agent, the source and the offline routes. Models
    go through `load_model`, which checks their keys."""
    owner = getattr(loader, "__self__", None)
    if isinstance(owner, type) and hasattr(owner, "load_state_dict"):
        raise TypeError(f"agent {agent!r}: load {owner.__name__} with load_model, which checks its keys")
    return _call(loader, source, agent, **kwargs)


def load_model(model_class, source: Source, agent: str, allowance: KeyAllowance = KeyAllowance(), *,
               subfolder: str | None = None, **kwargs):
    """`model_class.from_pretrained` (transformers or diffusers) that refuses a checkpoint with missing or
    unexpected keys beyond `allowance`, naming the agent, the count and the first keys."""
    where = {"subfolder": subfolder} if subfolder else {}
    loader = model_class.from_pretrained
    model, info = _call(loader, source, agent, output_loading_info=True, **where, **kwargs)
    place = source.describe() + (f" ({subfolder})" if subfolder else "")
    missing, unexpected = check_keys(agent, model_class.__name__, place, info, allowance)
    config_file = f"{subfolder}/config.json" if subfolder else "config.json"
    record = LoadedWeights(agent=agent, model=type(model).__name__, source=source.describe(), subfolder=subfolder,
                           directory=files_directory(source, subfolder, config_file),
                           commit=hub_commit(source, config_file), missing=missing, unexpected=unexpected)
    for records in _RECORDERS:
        records.append(record)
    return model


def _call(loader, source: Source, agent: str, **kwargs):
    if source.local_path is not None and not os.path.exists(source.local_path):
        raise FileNotFoundError(f"agent {agent!r}: local path {source.local_path} does not exist")
    if source.local_path is None and source.hub_id is None:
        raise ValueError(f"agent {agent!r} has no hub checkpoint ({source.note or source.describe()}); "
                         f"give a local path with --agent-path {agent}=DIR")
    location, where = ((source.local_path, {}) if source.local_path is not None else
                       (source.hub_id, {"revision": source.revision, "local_files_only": hub_offline()}))
    try:
        return loader(location, **where, **kwargs)
    except OSError as error:
        raise OSError(f"agent {agent!r}: cannot load {source.describe()}: {error}\n{offline_help(agent)}") from error


def check_keys(agent: str, model: str, place: str, info: dict, allowance: KeyAllowance) -> tuple[list, list]:
    """(allowed missing keys, allowed unexpected keys) of a load report; anything else is a WeightsMismatch."""
    found = {kind: sorted(str(key) for key in info.get(f"{kind}_keys") or ()) for kind in ("missing", "unexpected")}
    problems = []
    for kind, keys in found.items():
        refused = [key for key in keys if not allowance.allows(kind, key)]
        if refused:
            problems.append(f"{len(refused)} {kind} key(s) ({_first(refused)})")
    mismatched = sorted(str(key) for key in info.get("mismatched_keys") or ())
    if mismatched:
        problems.append(f"{len(mismatched)} key(s) of another shape ({_first(mismatched)})")
    if info.get("error_msgs"):
        problems.append(f"loading errors: {'; '.join(map(str, info['error_msgs']))[:300]}")
    if problems:
        raise WeightsMismatch(f"agent {agent!r}: the checkpoint {place} does not fit {model}: {', '.join(problems)}; "
                              f"allowed for {agent}: {describe_allowance(allowance)}. Refusing to run with layers "
                              f"left at random or weights ignored.")
    return found["missing"], found["unexpected"]


def describe_allowance(allowance: KeyAllowance) -> str:
    parts = [f"{kind} {', '.join(patterns)}" for kind in ("missing", "unexpected")
             if (patterns := getattr(allowance, kind))]
    return "; ".join(parts) + (f" ({allowance.reason})" if allowance.reason else "") if parts else "none"


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:FIRST_KEYS]) + (", ..." if len(keys) > FIRST_KEYS else "")


@contextlib.contextmanager
def seeded(seed: int):
    """Build tiny random models from `seed` without disturbing the global torch RNG. Models are initialised on the
    CPU, so only the CPU generator is seeded (torch.manual_seed would also reseed, and not restore, CUDA's)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def torch_dtype(name: str):
    import torch

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported compute dtype {name!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)

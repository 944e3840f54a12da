"""Loading helpers shared by agent modules: real weights with an error that names the offline routes, and
seeded tiny random models that leave the caller's RNG untouched."""
from __future__ import annotations

import contextlib
import os

from extract.agents.base import Source


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_help(agent: str) -> str:
    return (f"Offline routes: pass a local copy with --agent-path {agent}=DIR, or set HF_HUB_OFFLINE=1 with the "
            f"model already in the Hugging Face cache (HF_HOME).")


def from_pretrained(loader, source: Source, agent: str, **kwargs):
    """`loader(location, **kwargs)` (a transformers `from_pretrained`) for a local path or a hub id at its pinned
    revision. Hub failures are re-raised naming the agent, the source and the offline routes."""
    if source.local_path is not None:
        if not os.path.exists(source.local_path):
            raise FileNotFoundError(f"agent {agent!r}: local path {source.local_path} does not exist")
        location, where = source.local_path, {}
    elif source.hub_id is not None:
        location, where = source.hub_id, {"revision": source.revision, "local_files_only": hub_offline()}
    else:
        raise ValueError(f"agent {agent!r} has no hub checkpoint ({source.note or 'no source'}); "
                         f"give a local path with --agent-path {agent}=DIR")
    try:
        return loader(location, **where, **kwargs)
    except OSError as error:
        raise OSError(f"agent {agent!r}: cannot load {source.describe()}: {error}\n{offline_help(agent)}") from error


def resolved_source(source: Source, config) -> dict:
    """What the manifest records about the weights: the source and, for hub downloads, the resolved commit."""
    return {"source": source.describe(), "commit": getattr(config, "_commit_hash", None)}


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

    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported compute dtype {name!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)

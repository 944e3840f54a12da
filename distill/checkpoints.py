"""Checkpoints that cannot run code: tensors in a safetensors file, everything else as JSON in its header.

A run directory may come from anyone (a lab-mate's runs, a download), and `evaluate` and `--resume` read it; a pickle
there runs whatever it names. A safetensors file is a JSON header plus raw tensor bytes, so reading one only parses.
Prompts, gates, optimiser buffers and the torch RNG states are tensors (`prompts/<name>`, `gates/<name>`,
`optimizer/<param>/<buffer>`, `rng/torch`, `rng/cuda/<device>`); the epoch, the optimiser's hyper-parameters, the
numpy and python RNG states and the configuration are JSON in the header's metadata. Everything round-trips bit
for bit, so a resumed run still equals an uninterrupted one.

Checkpoints of earlier versions (`checkpoint.pt`, a torch pickle) are read with `torch.load(weights_only=True)`,
which refuses any pickle that would call something other than tensor and numpy-array constructors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

FILE = "checkpoint.safetensors"
LEGACY_FILE = "checkpoint.pt"
FORMAT = "transagent-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read; the message names the file and what is wrong with it."""


def find(run_dir) -> Path | None:
    """The run's checkpoint (this format first, then an earlier version's), or None."""
    for name in (FILE, LEGACY_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None


def save(path, state: dict) -> None:
    """Write `state` (the dict `Trainer.state()` returns) atomically."""
    from safetensors.torch import save_file

    tensors, meta = _split(state)
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary, metadata={"format": FORMAT, "version": str(VERSION), "state": json.dumps(meta)})
    os.replace(temporary, path)


def load(path) -> dict:
    """The state dict saved by `save` (or an earlier version's `checkpoint.pt`), tensors on the CPU (loading them
    into modules and optimisers moves them to their device; RNG states must stay on the CPU)."""
    path = Path(path)
    if path.suffix == ".pt":
        return _load_legacy(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({error})") from None
    if header.get("format") != FORMAT or header.get("version") != str(VERSION):
        raise CheckpointError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; this "
                              f"code reads {FORMAT!r} version {VERSION}")
    try:
        return _join(tensors, json.loads(header["state"]))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: damaged checkpoint header ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------------------------------

def _split(state: dict) -> tuple[dict, dict]:
    """(tensors, JSON-able rest) of a trainer state."""
    tensors = {f"prompts/{name}": value for name, value in state["prompts"].items()}
    tensors.update({f"gates/{name}": value for name, value in state["gates"].items()})
    optimizer = state["optimizer"]
    scalars = {}
    for param, buffers in optimizer["state"].items():
        for key, value in buffers.items():
            if hasattr(value, "dtype") and hasattr(value, "shape"):
                tensors[f"optimizer/{param}/{key}"] = value
            else:
                scalars.setdefault(str(param), {})[key] = value
    rng = state["rng"]
    tensors["rng/torch"] = rng["torch"]
    for index, cuda_state in enumerate(rng["cuda"] or []):
        tensors[f"rng/cuda/{index}"] = cuda_state
    kind, keys, position, has_gauss, cached_gaussian = rng["numpy"]
    meta = {
        "epoch": state["epoch"], "gates_built_for": state["gates_built_for"], "schedule": state["schedule"],
        "config": state["config"],
        "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
        "rng": {"numpy": {"kind": kind, "keys": [int(k) for k in keys], "position": int(position),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
                "python": _python_state_to_json(rng["python"]),
                "cuda_devices": None if rng["cuda"] is None else len(rng["cuda"])},
    }
    # safetensors stores each tensor's own bytes: no views into shared storage, always contiguous, on the CPU
    return {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}, meta


def _join(tensors: dict, meta: dict) -> dict:
    """The trainer state back from `_split`'s two halves."""
    import numpy as np

    def group(prefix):
        return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}

    optimizer_state: dict[int, dict] = {}
    for name, value in group("optimizer/").items():
        param, _, key = name.partition("/")
        optimizer_state.setdefault(int(param), {})[key] = value
    for param, values in meta["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(param), {}).update(values)
    numpy_state = meta["rng"]["numpy"]
    cuda_devices = meta["rng"]["cuda_devices"]
    return {
        "epoch": int(meta["epoch"]), "prompts": group("prompts/"), "gates": group("gates/"),
        "gates_built_for": meta["gates_built_for"], "schedule": meta["schedule"], "config": meta["config"],
        "optimizer": {"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
        "rng": {"torch": tensors["rng/torch"],
                "numpy": (str(numpy_state["kind"]), np.array(numpy_state["keys"], dtype=np.uint32),
                          int(numpy_state["position"]), int(numpy_state["has_gauss"]),
                          float(numpy_state["cached_gaussian"])),
                "python": _python_state_from_json(meta["rng"]["python"]),
                "cuda": None if cuda_devices is None else [tensors[f"rng/cuda/{i}"] for i in range(int(cuda_devices))]},
    }


def _python_state_to_json(state) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_state_from_json(state) -> tuple:
    version, internal, gauss_next = state
    if not all(isinstance(value, int) for value in internal):
        raise TypeError("python RNG state must be integers")
    return int(version), tuple(internal), None if gauss_next is None else float(gauss_next)


def _load_legacy(path: Path) -> dict:
    import pickle

    import numpy as np
    import torch

    numpy_core = getattr(np, "_core", None) or np.core
    allowed = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"it asks for {named.group(1)}" if named else str(error).splitlines()[0]
        raise CheckpointError(f"{path}: refused to load a pickle that would run code ({what}); a checkpoint holds "
                              f"tensors only, and this code writes them as {FILE}") from None
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... for a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not {"epoch", "prompts", "gates", "optimizer", "rng"} <= set(state):
        raise CheckpointError(f"{path}: not a checkpoint of this program (expected epoch, prompts, gates, optimizer "
                              "and rng)")
    return state

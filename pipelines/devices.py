"""Which device a command computes on, and in which dtype: one policy for every command.

`auto` is this process's GPU (under torchrun, the rank's own: cuda:<LOCAL_RANK>) or the CPU. A device is checked
before any model is built, so a typo or a missing GPU is one line naming the flag, not a traceback an hour in. A
node that only submits jobs to others (`--launcher submitit`) checks only that the device parses: its tasks check
it again where they run.
"""
from __future__ import annotations

import os


class DeviceError(ValueError):
    """A device that is not one, or that this machine does not have."""


def resolve_device(device: str, usable_here: bool = True) -> str:
    """`device` with auto resolved, checked usable here (or, with usable_here=False, only that it parses)."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if usable_here and parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{device!r}: torch sees no CUDA GPU on this machine; use cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def planning_device(device: str, cluster: str) -> str:
    """The device a submitting node plans with. With --cluster local the tasks run here, so `device` must be
    usable here; elsewhere a device that parses is enough, and where this node lacks it, its own is used."""
    if cluster == "local":
        return resolve_device(device)
    resolve_device(device, usable_here=False)
    try:
        return resolve_device(device)
    except DeviceError:
        return resolve_device("auto")


def compute_dtype(device: str) -> str:
    """The dtype models compute in: half precision on a GPU, float32 on the CPU."""
    return "float16" if device.startswith("cuda") else "float32"

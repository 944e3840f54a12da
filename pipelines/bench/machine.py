"""What the numbers were measured on."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

DISTRIBUTIONS = {"open_clip": "open_clip_torch", "transformers": "transformers", "diffusers": "diffusers",
                 "zarr": "zarr", "h5py": "h5py"}


def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, library versions, the GPU if any."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": model, "cpu_count": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
        "memory_bytes": _meminfo("MemTotal"), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "load_average_at_start": load_average(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for name, distribution in DISTRIBUTIONS.items():   # read from the installed metadata: nothing is imported
        try:
            info[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def _meminfo(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None

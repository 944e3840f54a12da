"""What the numbers were measured on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, library versions, the GPU if any."""
    import torch

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
        "torch": torch.__version__, "numpy": np.__version__, "load_average_at_start": _load_average(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("open_clip", "transformers", "zarr", "h5py"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - versions are informational
            info[package] = None
    return info


def _meminfo(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None

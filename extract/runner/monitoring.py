"""What one agent's run reports: its progress (for the error of a failed run), peak memory, and the JSON-lines log."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache_schema.lock import locked_message

logger = logging.getLogger(__name__)


@dataclass
class AgentReport:
    agent: str
    status: str                      # "skipped" (already complete) | "done" | "failed"
    cache: str
    rows: int = 0                    # rows computed by this process
    seconds: float = 0.0
    images_per_second: float = 0.0
    compute_seconds: float = 0.0     # computing and writing the rows: no loading, planning or finishing
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    model_loaded: bool = False
    error: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Progress:
    """How far one agent got; read when it fails, to say what failed (loading or computing) and what was kept."""

    phase: str = "planning"
    rows: int = 0
    model_loaded: bool = False
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0


class MemoryMonitor:
    """Peak resident memory and peak GPU allocation while one agent runs.

    RSS is sampled on a thread and at the points where it peaks (model loaded, batch computed), so a short run
    still records its model."""

    def __init__(self, device: str, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.peak_rss = self.peak_gpu = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, current_rss())

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self):
        if self.device.startswith("cuda"):
            import torch  # only on a GPU run: a CPU run needs no torch here

            torch.cuda.reset_peak_memory_stats()
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.device.startswith("cuda"):
            import torch

            self.peak_gpu = int(torch.cuda.max_memory_allocated())


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def waiting_for_lock(path: Path, holder, wait: float) -> None:
    """Said once when an extraction starts waiting for another writer (--wait)."""
    logger.warning("%s; waiting up to %g s", locked_message(path, holder).split(";")[0], wait)


def log(log_path, entry, rank: int) -> None:
    """Append one JSON line (an AgentReport or a dict) to the extraction log."""
    if log_path is None:
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    data = entry.__dict__ if isinstance(entry, AgentReport) else dict(entry)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rank": rank, **data}
    with open(log_path, "a") as handle:
        handle.write(json.dumps(line) + "\n")

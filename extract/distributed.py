"""torchrun: this process's rank, and the process group the ranks synchronise through while they extract."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator


def rank_and_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def process_group(world_size: int, device: str) -> Iterator[Callable[[], None]]:
    """A barrier over the ranks (nccl on GPUs, gloo on the CPU), the group torn down on exit; a no-op barrier
    for one process."""
    if world_size <= 1:
        yield lambda: None
        return
    import torch.distributed as dist   # only under torchrun: a plain run never imports torch.distributed

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield dist.barrier
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Reader leases and scratch directories.

A process that uses a cache holds a lease, `with reading(cache_dir): ...` (a file `.readers/<pid>@<host>-<token>`);
`gc` never deletes a cache with a live lease. A process that changes a cache (merge, install, gc) holds its writer
lock (`cache_schema.lock`), as an extraction does.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from cache_schema.layout import READERS


INCOMING = ".incoming"   # pulls in progress: <cache_root>/.incoming/<lease>/... (never matched by list_caches)
TRASH = ".trash"         # caches being deleted by gc: renamed here first, then removed


def lease_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}"


@contextmanager
def reading(cache_dir):
    """Hold a lease on a cache while using it, so `gc` leaves it alone. A read-only cache gets no lease."""
    lease = Path(cache_dir) / READERS / lease_name()
    try:
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    except OSError:  # read-only mount: nobody here can delete it either
        lease = None
    try:
        yield lease
    finally:
        if lease is not None:
            lease.unlink(missing_ok=True)


def lease_alive(name: str) -> bool:
    """A lease of another host cannot be checked and counts as alive; one of this host lives while its pid does."""
    pid, _, rest = name.partition("@")
    host = rest.rsplit("-", 1)[0]
    if not pid.isdigit() or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def active_readers(cache_dir) -> list[str]:
    """Names of the live leases on a cache (`<pid>@<host>-<token>`)."""
    directory = Path(cache_dir) / READERS
    if not directory.is_dir():
        return []
    return sorted(lease.name for lease in directory.iterdir() if lease_alive(lease.name))


@contextmanager
def incoming_dir(cache_root):
    """A private scratch directory inside the cache root (same filesystem, so the final rename is atomic)."""
    path = Path(cache_root) / INCOMING / lease_name()
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

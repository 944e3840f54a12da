"""Garbage collection: partial caches, caches nobody references, and leftovers of interrupted work."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cache_schema.catalogue import disk_usage, list_caches
from cache_schema.errors import CacheError
from cache_schema.layout import MANIFEST
from cache_schema.leases import INCOMING, TRASH, active_readers, lease_alive, lease_name
from cache_schema.lock import current_holder, writer_lock
from cache_schema.manifest import read_manifest


@dataclass
class GcCandidate:
    path: Path
    reason: str
    bytes: int
    readers: list[str]      # live leases: such a cache is kept
    status: str = ""        # the manifest's status when listed; removal re-checks it
    writer: str = ""        # the live writer lock's holder: such a cache is kept
    unreadable: str = ""    # why its manifest cannot be read: such a cache is reported and kept

    @property
    def in_use(self) -> bool:
        return bool(self.readers or self.writer)


def gc_candidates(cache_root, referenced: set[str] | None) -> list[GcCandidate]:
    """Partial caches, complete ones not in `referenced` (cache directories relative to the root, POSIX; None:
    nobody said which are used, so every complete cache is kept), and leftovers of interrupted pulls or gc runs.
    A cache whose manifest cannot be read (damaged, or of another schema version) is listed as unreadable: what it
    holds is unknown, so it is never collected."""
    cache_root = Path(cache_root)
    candidates = []
    for path, manifest in list_caches(cache_root):
        status = manifest.get("status")
        if "problem" in manifest:
            candidates.append(GcCandidate(path, "unreadable manifest", disk_usage(path), [], "unreadable",
                                          unreadable=manifest["problem"]))
            continue
        if status != "complete":
            reason = f"{status or 'unknown'} cache"
        elif referenced is not None and path.relative_to(cache_root).as_posix() not in referenced:
            reason = "not referenced by any run"
        else:
            continue
        writer = current_holder(path)
        candidates.append(GcCandidate(path, reason, disk_usage(path), active_readers(path), status or "",
                                      writer.describe() if writer else ""))
    leftovers = [(path, "leftover of an interrupted pull or push")
                 for pattern in (f"{INCOMING}/*", f"*/*/{INCOMING}/*")
                 for path in sorted(cache_root.glob(pattern)) if not lease_alive(path.name)]
    leftovers += [(path, "leftover of an interrupted gc") for path in sorted(cache_root.glob(f"{TRASH}/*"))]
    candidates += [GcCandidate(path, reason, disk_usage(path), []) for path, reason in leftovers]
    return candidates


def remove_cache(path, cache_root, status: str | None = None, wait: float = 0.0) -> bool:
    """Delete a cache unless it has a live lease or a writer, or a manifest this code cannot read. Under its writer
    lock (a held one raises WriterLocked, after `wait` seconds), the status must still be `status` (the one it was
    chosen for: a partial cache that has just become complete is kept); it is then renamed into `.trash/` (so no
    new reader can open it) and the leases are checked again there; returns False (and puts it back) if one
    appeared."""
    path, cache_root = Path(path), Path(cache_root)
    if path.parent.name in (INCOMING, TRASH):
        shutil.rmtree(path, ignore_errors=True)  # a leftover, not a cache
        return True
    if not path.is_dir():
        return False
    with writer_lock(path, wait, purpose="gc", create=False):
        current = _status(path)
        if current == "unreadable" or (status is not None and current != status):
            return False
        return _remove_unread(path, cache_root)


def _status(path: Path) -> str:
    """The manifest's status; "unreadable" for one this code cannot use (a cache is never deleted unread)."""
    try:
        return read_manifest(path / MANIFEST)["status"]
    except (CacheError, OSError):
        return "unreadable"


def _remove_unread(path: Path, cache_root: Path) -> bool:
    if active_readers(path):
        return False
    trash = cache_root / TRASH / lease_name()
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, trash)
    if active_readers(trash):
        os.rename(trash, path)
        return False
    shutil.rmtree(trash)
    for parent in (path.parent, path.parent.parent):  # drop emptied <agent>/ and <dataset>/ directories
        if parent != cache_root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return True

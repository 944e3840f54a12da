"""One writer per cache directory: `with writer_lock(cache_dir): ...`.

An extraction holds it from planning to the atomic `complete`; `merge`, pack installation and `gc` hold it while
they change a cache. Two writers would otherwise both plan `seg-00000` and mislabel each other's rows, and a `gc`
between the last journaled row and `complete` would delete finished work. The lock lives in `<cache>/.writer/`:

    lock        an OS file lock (`filelock`: flock). Exclusive on this machine and on file systems that share locks
                between nodes; the kernel releases it when its holder dies. The file itself is never removed (a
                waiter must lock the same inode as the holder).
    lease.json  {pid, host, since, purpose, token}: names the holder when a second writer is refused, and keeps
                writers on different nodes apart where the file system's locks are node-local. Created exclusively;
                a heartbeat thread refreshes its mtime while the writer lives. A lease without a heartbeat for
                `stale_after` seconds (a dead node) is taken over, as is one of this host whose pid is gone;
                `force_unlock` removes the rest.

The lease is read from a shared file system, so it is hostile input: only its types are trusted, never a path.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from cache_schema.errors import CacheError

WRITER = ".writer"       # <cache>/.writer/: not part of the cache (never packed, checksummed or listed)
LOCK = "lock"
LEASE = "lease.json"
STALE_AFTER = 300.0      # seconds without a heartbeat after which a lease belongs to a dead writer
HEARTBEAT = 30.0         # seconds between two refreshes of a live lease
POLL = 0.1               # seconds between two attempts while waiting for the lock


class WriterLocked(CacheError):
    """Another writer holds the cache; `holder` names it (None: its lease is not written yet). `cache_dir` is set
    where waiting or a forced unlock would free it (not where the holder still has the OS file lock)."""

    def __init__(self, message: str, holder: "Holder | None" = None, cache_dir: Path | None = None):
        super().__init__(message)
        self.holder = holder
        self.cache_dir = cache_dir


class WriterLockLost(CacheError):
    """This writer's lease was removed or taken over while it wrote."""


@dataclass
class Holder:
    pid: int | None
    host: str
    since: str
    purpose: str
    token: str
    heartbeat_age: float        # seconds since the lease's mtime was last refreshed

    def describe(self) -> str:
        who = f"pid {self.pid} on host {self.host}" if self.pid is not None else "an unknown process (lease unreadable)"
        what = f" ({self.purpose})" if self.purpose else ""
        return f"{who}{what} since {self.since}, last heartbeat {max(self.heartbeat_age, 0):.0f} s ago"


def read_lease(path: Path) -> Holder | None:
    """The lease at `path`, or None when there is none. A lease with wrong types still counts, as unknown."""
    try:
        status = os.lstat(path)
        age = time.time() - status.st_mtime
        data = None
        if stat.S_ISREG(status.st_mode):   # a link or a FIFO is not opened: it might point anywhere, or block
            with open(path, "rb") as handle:
                data = json.loads(handle.read(4096))
    except FileNotFoundError:
        return None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Holder(None, "?", "?", "", "", age)

    def text_field(name: str) -> str:
        value = data.get(name)
        return value[:80] if isinstance(value, str) else "?"

    pid = data.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
    return Holder(pid, text_field("host"), text_field("since"), text_field("purpose"), text_field("token"), age)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def is_live(holder: Holder, stale_after: float = STALE_AFTER) -> bool:
    """A lease is live while its heartbeat is fresh and, on this host, while its pid runs."""
    if holder.heartbeat_age > stale_after:
        return False
    if holder.host == socket.gethostname() and holder.pid is not None:
        return pid_alive(holder.pid)
    return True


def current_holder(cache_dir, stale_after: float = STALE_AFTER) -> Holder | None:
    """The live writer of a cache, read from its lease only: no lock is taken, so a writer starting at this moment
    is not refused because of the look."""
    holder = read_lease(Path(cache_dir) / WRITER / LEASE)
    return holder if holder is not None and is_live(holder, stale_after) else None


def locked_message(cache_dir, holder: Holder | None) -> str:
    who = holder.describe() if holder is not None else "another process (its lease is not written yet)"
    return (f"{cache_dir} is being written by {who}; one writer per cache: wait for it, or, if that process is "
            "dead, unlock it by force")


class WriterLock:
    """The exclusive writer lock of one cache directory (see the module docstring)."""

    def __init__(self, cache_dir, purpose: str = "write", stale_after: float = STALE_AFTER,
                 heartbeat: float = HEARTBEAT, create: bool = True):
        self.cache_dir = Path(cache_dir)
        self.purpose, self.stale_after, self.heartbeat = purpose, stale_after, heartbeat
        self.create = create      # False: the cache must exist (merge, gc, install never make an empty one)
        self.directory = self.cache_dir / WRITER
        self.lease_path = self.directory / LEASE
        self.token = secrets.token_hex(8)
        self.lost = ""
        self._os_lock = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._thread is not None

    def acquire(self, wait: float = 0.0, on_wait: Callable[[Holder | None], None] | None = None) -> "WriterLock":
        """Take the lock, or raise WriterLocked naming the holder; with `wait` > 0, retry for that many seconds
        (`on_wait(holder)` is called once, when the waiting starts)."""
        if math.isnan(wait):
            raise ValueError("wait must be a number of seconds, got nan")
        deadline = time.monotonic() + max(wait, 0.0)
        told = False
        while True:
            try:
                self._try_acquire()
                return self
            except WriterLocked as locked:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                if on_wait is not None and not told:
                    on_wait(locked.holder)
                    told = True
                time.sleep(min(POLL, remaining))

    def _try_acquire(self) -> None:
        if not self.create and not self.cache_dir.is_dir():
            raise CacheError(f"{self.cache_dir}: no such cache directory")
        try:
            self.directory.mkdir(parents=self.create, exist_ok=True)
            os_lock = FileLock(str(self.directory / LOCK))
            os_lock.acquire(timeout=0)
        except Timeout:
            holder = read_lease(self.lease_path)
            raise WriterLocked(locked_message(self.cache_dir, holder), holder, self.cache_dir) from None
        except OSError as error:
            raise _unlockable(self.cache_dir, error) from None
        try:
            self._claim_lease()
        except OSError as error:
            os_lock.release()
            raise _unlockable(self.cache_dir, error) from None
        except BaseException:
            os_lock.release()
            raise
        self._os_lock = os_lock
        self.lost = ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="cache-writer-heartbeat", daemon=True)
        self._thread.start()

    def _claim_lease(self) -> None:
        current = read_lease(self.lease_path)
        if current is not None:
            if is_live(current, self.stale_after):
                raise WriterLocked(locked_message(self.cache_dir, current), current, self.cache_dir)
            self._remove_stale(current)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "purpose": self.purpose,
                  "token": self.token}
        try:
            fd = os.open(self.lease_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:   # another writer claimed it between our read and our create
            holder = read_lease(self.lease_path)
            raise WriterLocked(locked_message(self.cache_dir, holder), holder, self.cache_dir) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(record) + "\n")

    def _remove_stale(self, stale: Holder) -> None:
        """Move the stale lease aside, then make sure what was moved is the lease judged stale (a writer on another
        node may have replaced it meanwhile); put back a live one."""
        aside = self.directory / f"{LEASE}.stale-{self.token}"
        try:
            os.rename(self.lease_path, aside)
        except FileNotFoundError:
            return
        moved = read_lease(aside)
        if moved is not None and moved.token != stale.token and is_live(moved, self.stale_after):
            try:
                os.link(aside, self.lease_path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            raise WriterLocked(locked_message(self.cache_dir, moved), moved, self.cache_dir)
        aside.unlink(missing_ok=True)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.beat()

    def beat(self) -> None:
        """Refresh the lease's mtime, and notice when the lease is no longer ours."""
        try:
            current = read_lease(self.lease_path)
            if current is None or current.token != self.token:
                self.lost = "removed" if current is None else f"taken over by {current.describe()}"
                return
            os.utime(self.lease_path)
        except OSError:   # a passing hiccup of a network file system: the next beat tries again
            pass

    def check(self) -> None:
        """Raise WriterLockLost if the lease is gone or someone else's (checked now, not at the last beat)."""
        self.beat()
        if self.lost:
            raise WriterLockLost(f"{self.cache_dir}: this process's writer lock was {self.lost} while it wrote "
                                 "(unlocked by force, or no heartbeat for "
                                 f"{self.stale_after:.0f} s); the cache stays partial: re-run the same command")

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            current = read_lease(self.lease_path)
            if current is not None and current.token == self.token:
                self.lease_path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os_lock, self._os_lock = self._os_lock, None
            if os_lock is not None:
                os_lock.release()

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def writer_lock(cache_dir, wait: float = 0.0, purpose: str = "write",
                on_wait: Callable[[Holder | None], None] | None = None, create: bool = True):
    """Hold the writer lock of a cache directory (created if absent, with `create`) for the duration of the block."""
    lock = WriterLock(cache_dir, purpose, create=create).acquire(wait, on_wait)
    try:
        yield lock
    finally:
        lock.release()


def force_unlock(cache_dir) -> Holder | None:
    """Remove the lease of a writer known to be dead; returns what it said (None: there was none).

    Refused while a live process holds the OS lock: removing the lease would not free the cache, and the lock file
    is never removed (a waiter on the old inode and a newcomer on a new one would both hold it)."""
    directory = Path(cache_dir) / WRITER
    if not directory.is_dir():
        return None
    os_lock = FileLock(str(directory / LOCK))
    try:
        os_lock.acquire(timeout=0)
    except Timeout:
        holder = read_lease(directory / LEASE)
        who = holder.describe() if holder is not None else "a process whose lease is not written yet"
        raise WriterLocked(f"{cache_dir}: a live process holds its OS file lock ({who}); stop that process "
                           "instead: a lock its holder still has cannot be released", holder) from None
    except OSError as error:
        raise CacheError(f"{cache_dir}: cannot open its writer lock ({error.strerror or error})") from None
    try:
        holder = read_lease(directory / LEASE)
        (directory / LEASE).unlink(missing_ok=True)
        return holder
    finally:
        os_lock.release()


def _unlockable(cache_dir, error: OSError) -> CacheError:
    return CacheError(f"{cache_dir}: cannot take its writer lock in {WRITER}/ ({error.strerror or error}); a cache is "
                      "written only where it can be locked (a read-only cache can still be read)")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

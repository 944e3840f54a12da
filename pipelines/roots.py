"""A root a command writes into (caches, runs, job folders) is checked before any work, so a read-only mount or a
full disk is one line naming the flag, not a failure after the first hour."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class RootNotWritable(ValueError):
    """The directory cannot be written; the message names the flag that chose it."""


def require_writable(directory, flag: str) -> None:
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise RootNotWritable(f"{flag} {directory} is not writable ({reason}); nothing was written. Choose another "
                              f"{flag}, or make it writable") from None

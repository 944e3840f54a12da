"""What to do about a cache error, in this command line's words.

`cache_schema` says what is wrong with a cache and knows nothing of the commands that fix it; they are added here,
where an error is shown to the user."""
from __future__ import annotations

from cache_schema.errors import (AmbiguousCacheError, BackendMismatch, CacheError, ChecksumMismatch,
                                 DivergedCacheError, NoSpaceError, PartialCacheError)
from cache_schema.lock import WriterLocked


def hint(error: CacheError) -> str:
    """The command that fixes `error` ("" when there is none to name)."""
    if isinstance(error, AmbiguousCacheError):
        return f"pin one with --cache-fingerprint {error.agent}=<fingerprint>"
    if isinstance(error, BackendMismatch):
        return f"re-run with --backend {error.backend}, or use another --cache-root"
    if isinstance(error, ChecksumMismatch):
        return "`transagent cache verify` lists every damaged file; pull the cache again or re-extract it"
    if isinstance(error, DivergedCacheError):
        return "pull into another --cache-root, then `transagent cache merge` it into this one"
    if isinstance(error, NoSpaceError):
        return "`transagent cache gc --apply` deletes partial and unreferenced caches"
    if isinstance(error, PartialCacheError):
        return ("a partial cache is finished by the same `transagent extract` run again, or deleted by "
                "`transagent cache gc --apply`")
    if isinstance(error, WriterLocked) and error.cache_dir is not None:
        return locked_hint(error.cache_dir)
    return ""


def locked_hint(cache_dir) -> str:
    return (f"wait for it with --wait SECONDS, or, if that process is dead, "
            f"`transagent cache unlock --force {cache_dir}`")


def explained(error: CacheError) -> str:
    """The error's message, then the command that fixes it on a line of its own."""
    advice = hint(error)
    return f"{error}\n  {advice}" if advice else str(error)

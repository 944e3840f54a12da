"""Every way a cache can be unusable, one type each, so callers match types (never message text) and the
application can say what to do about each in its own words. Messages say what is wrong, naming the cache."""
from __future__ import annotations


class CacheError(Exception):
    """Base class: the cache cannot be used as asked."""


class NoCacheError(CacheError):
    """No cache where one was asked for: none of this agent under the root, or a directory without a manifest."""


class AmbiguousCacheError(CacheError):
    """Several complete caches match a request; `fingerprints` names them, so the caller can choose or pin one."""

    def __init__(self, message: str, agent: str, fingerprints: list[str]):
        super().__init__(message)
        self.agent = agent
        self.fingerprints = fingerprints


class SchemaVersionError(CacheError):
    pass


class FingerprintMismatch(CacheError):
    def __init__(self, message: str, differing: list[str] | None = None):
        super().__init__(message)
        self.differing = differing or []


class BackendMismatch(CacheError):
    """The cache of these fields exists with another storage backend (`backend`)."""

    def __init__(self, message: str, backend: str):
        super().__init__(message)
        self.backend = backend


class PartialCacheError(CacheError):
    pass


class CorruptCacheError(CacheError):
    pass


class ChecksumMismatch(CorruptCacheError):
    """A file of a local cache no longer has the sha256 its manifest records (damaged or edited)."""


class MissingRowsError(CacheError):
    def __init__(self, message: str, agent: str, missing: list):
        super().__init__(message)
        self.agent = agent
        self.missing = missing


class MergeConflict(CacheError):
    """The same (key, view) or file exists in both caches with different bytes."""


class DivergedCacheError(CacheError):
    """A cache of the same fingerprint is already installed with other rows; the two can be merged."""


class NoSpaceError(CacheError):
    """Not enough free disk space for what was asked."""

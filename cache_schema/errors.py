"""Every way a cache can be unusable, each with a message that says what to do."""


class CacheError(Exception):
    """Base class: the cache cannot be used as asked."""


class SchemaVersionError(CacheError):
    pass


class FingerprintMismatch(CacheError):
    def __init__(self, message: str, differing: list[str] | None = None):
        super().__init__(message)
        self.differing = differing or []


class PartialCacheError(CacheError):
    pass


class CorruptCacheError(CacheError):
    pass


class MissingRowsError(CacheError):
    def __init__(self, message: str, agent: str, missing: list):
        super().__init__(message)
        self.agent = agent
        self.missing = missing

"""The on-disk contract between stage 1 and stage 2. Depends on numpy, zarr, h5py, Pillow and filelock only."""
from cache_schema.arrays import ArraySpec
from cache_schema.catalogue import list_caches, select_cache, verify
from cache_schema.errors import (AmbiguousCacheError, BackendMismatch, CacheError, ChecksumMismatch,
                                 CorruptCacheError, DivergedCacheError, FingerprintMismatch, MergeConflict,
                                 MissingRowsError, NoCacheError, NoSpaceError, PartialCacheError, SchemaVersionError)
from cache_schema.fingerprint import differing_fields, fingerprint
from cache_schema.layout import SCHEMA_VERSION, cache_dir, read_json, with_schema
from cache_schema.quantize import dequantize_int8, quantize_int8
from cache_schema.reader import CacheReader
from cache_schema.views import ViewSpec, apply_view, view_params
from cache_schema.writer import AgentCache, SegmentWriter

__all__ = [
    "ArraySpec", "AmbiguousCacheError", "BackendMismatch", "CacheError", "ChecksumMismatch", "CorruptCacheError",
    "DivergedCacheError", "FingerprintMismatch", "MergeConflict", "MissingRowsError", "NoCacheError", "NoSpaceError",
    "PartialCacheError", "SchemaVersionError", "differing_fields", "fingerprint", "dequantize_int8", "quantize_int8",
    "SCHEMA_VERSION", "AgentCache", "CacheReader", "SegmentWriter", "cache_dir", "list_caches", "read_json",
    "select_cache", "verify", "with_schema", "ViewSpec", "apply_view", "view_params",
]

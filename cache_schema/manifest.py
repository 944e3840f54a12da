"""What every reader relies on in a manifest: its schema version and its shape."""
from __future__ import annotations

from pathlib import Path

from cache_schema.arrays import DTYPES
from cache_schema.backends import BACKENDS
from cache_schema.errors import (CacheError, CorruptCacheError, FingerprintMismatch, PartialCacheError,
                                 SchemaVersionError)
from cache_schema.layout import (ARRAY_NAME, MANIFEST, READABLE_SCHEMAS, SHA256, is_inside, is_int, kind_name,
                                 read_json, valid_segment_name)


def manifest_problem(manifest) -> str | None:
    """What makes this JSON value unusable as a manifest (None: nothing); the schema version is checked apart."""
    if not isinstance(manifest, dict):
        return f"it is {kind_name(manifest)}, not an object"
    kinds = (("dataset", str), ("agent", str), ("fingerprint", str), ("fields", dict), ("arrays", dict),
             ("backend", str), ("status", str), ("segments", list), ("rows", int), ("checksums", dict))
    for key, kind in kinds:
        if key not in manifest:
            return f"field {key!r} is missing"
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and not is_int(value)):
            return f"field {key!r} is {kind_name(value)}, not {kind_name(kind())}"
    if manifest["backend"] not in BACKENDS:
        return f"backend {manifest['backend']!r} is not one of {', '.join(BACKENDS)}"
    if manifest["status"] not in ("partial", "complete"):
        return f"status {manifest['status']!r} is neither 'partial' nor 'complete'"
    for name, spec in manifest["arrays"].items():
        if not ARRAY_NAME.fullmatch(name):
            return f"array name {name!r} is not a plain name"
        if not (isinstance(spec, dict) and spec.get("dtype") in DTYPES and isinstance(spec.get("row_shape"), list)
                and all(is_int(d) and d >= 0 for d in spec["row_shape"])):
            return f"arrays.{name} is {spec!r}, not {{row_shape: [sizes], dtype: one of {', '.join(DTYPES)}}}"
    names = set()
    for i, segment in enumerate(manifest["segments"]):
        if not (isinstance(segment, dict) and valid_segment_name(segment.get("name")) and
                is_int(segment.get("rows")) and segment["rows"] >= 0):
            return f"segments[{i}] is {segment!r}, not {{name: 'seg-NNNNN', rows: count}}"
        if segment["name"] in names:
            return f"segment {segment['name']} is listed twice"
        names.add(segment["name"])
    if manifest["rows"] < 0:
        return f"rows is {manifest['rows']}"
    for relative, digest in manifest["checksums"].items():
        if not is_inside(relative):
            return f"checksums name {relative!r}, which is not a path inside the cache"
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            return f"checksums[{relative!r}] is {digest!r}, not a sha256 hex digest"
    return None


def check_manifest(manifest, where, versions=READABLE_SCHEMAS) -> dict:
    """The manifest if its schema version is one of `versions` and its shape is what every reader relies on."""
    if not isinstance(manifest, dict):
        raise CorruptCacheError(f"{where}: not a cache manifest (it is {kind_name(manifest)}, not an object)")
    check_schema(manifest, where, versions)
    problem = manifest_problem(manifest)
    if problem:
        raise CorruptCacheError(f"{where}: not a valid cache manifest: {problem}")
    return manifest


def check_schema(manifest: dict, where, versions=READABLE_SCHEMAS) -> None:
    version = manifest.get("schema_version")
    readable = " and ".join(str(v) for v in versions)
    if "schema_version" not in manifest:
        raise SchemaVersionError(f"{where}: no schema_version; not a cache manifest this code reads "
                                 f"(cache schema {readable})")
    if not is_int(version):
        raise SchemaVersionError(f"{where}: schema_version is {version!r} ({kind_name(version)}); it must be an "
                                 f"integer (this code reads cache schema {readable})")
    if version not in versions:
        raise SchemaVersionError(f"{where}: cache schema version {version}, this code reads {readable}; "
                                 "re-extract, or use the release that wrote it")


def read_manifest(path: Path, versions=READABLE_SCHEMAS) -> dict:
    return check_manifest(read_json(path), path, versions)


def complete_manifest(cache_dir: Path) -> dict:
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST}; not a cache directory")
    manifest = read_manifest(manifest_path)
    if manifest.get("status") != "complete":
        raise PartialCacheError(f"{cache_dir} is partial; finish it (`transagent extract` with the same options) "
                                "before packing or merging it")
    if manifest.get("fingerprint") != cache_dir.name:
        raise CorruptCacheError(f"{cache_dir}: the directory's name {cache_dir.name} differs from the manifest's "
                                f"fingerprint {manifest.get('fingerprint')}")
    return manifest


def resolved_commit(manifest: dict) -> str | None:
    """The hub commit a cache's rows were computed from; None for local or tiny weights (their content is in the
    fingerprint) and for caches that did not record one."""
    provenance = manifest.get("provenance") or {}
    source = provenance.get("source")
    return provenance.get("resolved_revision") or (source.get("commit") if isinstance(source, dict) else None)


def check_same_commit(first: dict, second: dict, first_name: str, second_name: str) -> None:
    """An agent without a pinned revision keeps its fingerprint when the hub's weights change, so rows of two
    resolved commits must never be combined into one cache."""
    a, b = resolved_commit(first), resolved_commit(second)
    if a and b and a != b:
        raise FingerprintMismatch(f"{first_name} was computed from hub commit {a} and {second_name} from {b}: same "
                                  f"fingerprint, other weights; refusing to combine their rows (pin the agent's "
                                  f"revision, or keep them in separate cache roots)", ["provenance.resolved_revision"])

"""Finding caches under a root: listing, choosing the one a run needs, verifying, summarising."""
from __future__ import annotations

import os
from pathlib import Path

from cache_schema.backends import RowSource, segment_path
from cache_schema.errors import (AmbiguousCacheError, CacheError, CorruptCacheError, FingerprintMismatch, NoCacheError,
                                 PartialCacheError, SchemaVersionError)
from cache_schema.fingerprint import differing_fields, fingerprint, sha256_file
from cache_schema.layout import (MANIFEST, ROWS, SCHEMA_VERSION, SEGMENTS, content_files, parse_rows, read_json,
                                 required_files, schema_1_allowance)
from cache_schema.manifest import Manifest, read_manifest
from cache_schema.reader import check_array_metadata, read_row_table
from cache_schema.writer import AgentCache


def verify(path) -> list[str]:
    """Every problem with a cache directory (empty list = good): schema, status, fingerprint, files listed but
    absent or altered, files present but not listed, and (when every file is intact) the manifest against the
    row table and the arrays' own metadata."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return [f"{path}: no {MANIFEST}"]
    try:
        data = read_manifest(manifest_path)
        manifest = Manifest.from_dict(data, manifest_path)
    except CacheError as error:
        return [str(error)]
    problems = []
    complete = manifest.is_complete
    if not complete:
        problems.append(f"{path}: status is {manifest.status!r}, not 'complete'")
    if manifest.fingerprint != path.name:
        problems.append(f"{path}: the manifest's fingerprint is {manifest.fingerprint}, the directory's name is "
                        f"{path.name}")
    expected_fp = fingerprint(manifest.fields)
    if expected_fp != path.name:
        problems.append(f"{path}: the manifest's fields hash to fingerprint {expected_fp}, the directory's name is "
                        f"{path.name} (fields edited?)")
    listed = manifest.checksums
    for relative, checksum in sorted(listed.items()):
        file = path / relative
        if file.is_symlink() or not file.is_file():
            problems.append(f"{path}: missing file {relative} (listed in the manifest, absent or not a plain file)")
        elif sha256_file(file) != checksum:
            problems.append(f"{path}: checksum mismatch in {relative}")
    if not complete:
        return problems
    present = set(content_files(path))
    for relative in sorted(present - set(listed) - schema_1_allowance(data)):
        problems.append(f"{path}: file {relative} is present but not listed in the manifest's checksums")
    for relative in sorted(required_files(data) - set(listed) - present):
        problems.append(f"{path}: missing file {relative} (and not listed in the manifest's checksums)")
    if not problems:
        try:
            read_row_table(path, manifest)
            for segment in manifest.segments:
                check_array_metadata(path, manifest, segment)
                RowSource(segment_path(path / SEGMENTS, segment.name, manifest.backend), manifest.arrays,
                          manifest.backend, segment.rows)
        except CacheError as error:
            problems.append(str(error))
    return problems


def list_caches(cache_root, dataset: str | None = None, agent: str | None = None) -> list[tuple[Path, dict]]:
    """(directory, manifest) of every cache under the root, optionally for one dataset/agent. A manifest that
    cannot be used is listed as {"status": "unreadable", "problem": why}; one of another schema version as it is,
    with its "problem"."""
    root = Path(cache_root)
    pattern = f"{dataset or '*'}/{agent or '*'}/*/{MANIFEST}"
    found = []
    for manifest_path in sorted(root.glob(pattern)):
        try:
            found.append((manifest_path.parent, read_manifest(manifest_path)))
        except SchemaVersionError as error:
            found.append((manifest_path.parent, {**read_json(manifest_path), "problem": str(error)}))
        except CacheError as error:
            found.append((manifest_path.parent, {"status": "unreadable", "problem": str(error)}))
    return found


def select_cache(cache_root, dataset: str, agent: str, required: dict, hint: str = "") -> Path:
    """The one complete cache of this agent whose fields agree with `required` (a subset of the fields tree).

    Errors name what is wrong: no cache, only partial ones, the differing fields of the closest cache, a damaged
    manifest, or several matches (pin one with its fingerprint). Of two matches of different schema versions,
    the current one is taken.
    """
    candidates = list_caches(cache_root, dataset, agent)
    suffix = f"\n  fill it with: {hint}" if hint else ""
    if not candidates:
        raise NoCacheError(f"no cache for agent {agent!r} on dataset {dataset!r} under {cache_root}{suffix}")
    matching, closest, damaged = [], None, []
    for path, manifest in candidates:
        if "problem" in manifest:
            damaged.append(manifest["problem"])
            continue
        diff = differing_fields(required, _subset(manifest["fields"], required))
        if not diff:
            matching.append((path, manifest))
        elif closest is None or len(diff) < len(closest[1]):
            closest = (path, diff)
    complete = [(path, manifest) for path, manifest in matching if manifest.get("status") == "complete"]
    current = [path for path, manifest in complete if manifest["schema_version"] == SCHEMA_VERSION]
    if len(complete) == 1 or len(current) == 1:
        return complete[0][0] if len(complete) == 1 else current[0]
    if len(complete) > 1:
        fingerprints = [path.name for path, _ in complete]
        raise AmbiguousCacheError(f"several complete caches of agent {agent!r} match: {', '.join(fingerprints)}; "
                                  "pin one by its fingerprint", agent, fingerprints)
    if matching:
        raise PartialCacheError(f"the cache of agent {agent!r} ({matching[0][0]}) is partial{suffix}")
    also = f"\n  {len(damaged)} cache(s) of it cannot be read, e.g. {damaged[0]}" if damaged else ""
    if closest is None:
        raise CorruptCacheError(f"no usable cache of agent {agent!r} on dataset {dataset!r}: {damaged[0]}"
                                f"{suffix}")
    raise FingerprintMismatch(f"no cache of agent {agent!r} matches this run; the closest ({closest[0]}) differs in "
                              f"{', '.join(closest[1])}{also}{suffix}", closest[1])


def _subset(tree, shape):
    """The part of `tree` that has the keys of `shape` (recursively); absent keys stay absent."""
    if not isinstance(shape, dict) or not isinstance(tree, dict):
        return tree
    return {key: _subset(tree[key], value) for key, value in shape.items() if key in tree}


def disk_usage(path) -> int:
    """Bytes allocated on disk (sparse files count what they use)."""
    total = 0
    for directory, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total


def summary(path, manifest: dict) -> dict:
    """What `cache ls` shows for one cache. Partial caches count the rows their journals mark done."""
    path = Path(path)
    status = manifest.get("status", "unreadable")
    rows = []
    try:
        if status == "complete":
            rows = parse_rows(read_json(path / ROWS), path / ROWS)
        elif status == "partial":
            rows = sorted(AgentCache(path, manifest).done_rows())
    except (CacheError, OSError, KeyError):
        status = "damaged"
    created = manifest.get("created", {})
    return {"dataset": path.parent.parent.name, "agent": path.parent.name, "fingerprint": path.name,
            "rows": len(rows), "views": 1 + max((int(view) for _, view in rows), default=-1),
            "bytes": disk_usage(path), "status": status, "created_by": created.get("by", "?"),
            "created_at": created.get("at", "?")}

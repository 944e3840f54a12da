"""Merging two caches of one fingerprint (e.g. extracted on two machines) into one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_schema.catalogue import verify
from cache_schema.errors import CacheError, CorruptCacheError, FingerprintMismatch, MergeConflict, NoCacheError
from cache_schema.fingerprint import differing_fields, sha256_file
from cache_schema.layout import FILES, MANIFEST
from cache_schema.lock import writer_lock
from cache_schema.manifest import check_same_commit, complete_manifest
from cache_schema.reader import CacheReader
from cache_schema.writer import AgentCache


@dataclass
class MergeResult:
    added_rows: int
    skipped_rows: int
    added_files: list[str]


def merge(src, dst, batch_rows: int = 64, wait: float = 0.0, callback=None) -> MergeResult:
    """Add the rows and files of cache `src` to cache `dst` (same fingerprint). New rows go into a new segment
    after dst's last; rows both hold must be byte-identical (else MergeConflict naming the key). Every check
    happens before dst is touched, under dst's writer lock (`wait` seconds for it). A merge killed while copying
    leaves dst partial (its new segment unfinished): extracting again with the cache's options finishes it, or
    restore dst from its pack. `callback` (fsspec's `set_size`/`relative_update`) follows the rows compared and
    copied."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CacheError(f"cannot merge {src} into itself")
    if not (dst / MANIFEST).is_file():
        raise NoCacheError(f"{dst}: no {MANIFEST}; not a cache directory")
    with writer_lock(dst, wait, purpose=f"merge from {src.name}", create=False) as lock:
        return _merge_locked(src, dst, batch_rows, lock.check, callback)


def _merge_locked(src: Path, dst: Path, batch_rows: int, still_ours, callback=None) -> MergeResult:
    src_manifest, dst_manifest = complete_manifest(src), complete_manifest(dst)
    diff = differing_fields(dst_manifest["fields"], src_manifest["fields"])
    diff += differing_fields(dst_manifest["arrays"], src_manifest["arrays"], "arrays")
    if diff:
        raise FingerprintMismatch(f"cannot merge {src} ({src.name}) into {dst} ({dst.name}): they differ in "
                                  f"{', '.join(diff)}", diff)
    check_same_commit(dst_manifest, src_manifest, str(dst), str(src))
    problems = verify(src) + verify(dst)
    if problems:
        raise CorruptCacheError("cannot merge damaged caches:\n  " + "\n  ".join(problems))
    names = tuple(dst_manifest["arrays"])
    source, target = CacheReader(src, memmap_arrays=names), CacheReader(dst, memmap_arrays=names)
    shared = [row for row in source.rows if target.has(row)]
    if callback is not None:
        callback.set_size(len(source.rows))
    for start in range(0, len(shared), batch_rows):
        batch = shared[start:start + batch_rows]
        for name in names:
            mine, theirs = target.read(name, batch), source.read(name, batch)
            for i, row in enumerate(batch):
                if mine[i].tobytes() != theirs[i].tobytes():
                    raise MergeConflict(f"row (key {row[0]!r}, view {row[1]}) of array {name!r} differs between "
                                        f"{src} and {dst}; refusing to overwrite it")
        if callback is not None:
            callback.relative_update(len(batch))
    new_files = _new_files(src, dst, src_manifest)
    new_rows = [row for row in source.rows if not target.has(row)]
    if not new_rows and not new_files:
        return MergeResult(0, len(shared), [])
    cache = AgentCache(dst, dst_manifest)
    plan = cache.plan(new_rows)
    cache.create_segments(verify_existing=False)   # dst was verified above
    for segment, local_rows in plan[0]:
        with cache.segment_writer(segment) as writer:
            for start in range(0, len(local_rows), batch_rows):
                local = local_rows[start:start + batch_rows]
                rows = [writer.rows[i] for i in local]
                writer.write(local, {name: source.read(name, rows) for name in names})
                if callback is not None:
                    callback.relative_update(len(local))
    for relative in new_files:
        cache.add_file(relative, (src / FILES / relative).read_bytes())
    merged = cache.manifest.setdefault("provenance", {}).get("merged", [])
    cache.set_provenance("merged", merged + [{"fingerprint": src.name, "created": src_manifest.get("created"),
                                              "rows_added": len(new_rows), "files_added": new_files}])
    still_ours()
    cache.finalize()
    return MergeResult(len(new_rows), len(shared), new_files)


def _new_files(src: Path, dst: Path, src_manifest: dict) -> list[str]:
    """Extra files of src (those its checksums list: nothing unlisted is adopted) that dst lacks; a file both have
    must be identical."""
    new = []
    for listed in sorted(name for name in src_manifest["checksums"] if name.startswith(f"{FILES}/")):
        path = src / listed
        relative = listed[len(FILES) + 1:]
        other = dst / FILES / relative
        if not other.exists():
            new.append(relative)
        elif sha256_file(other) != sha256_file(path):
            raise MergeConflict(f"file {FILES}/{relative} differs between {src} and {dst}; refusing to overwrite it")
    return new

"""Writing a cache: plan rows into segments, write and journal them, mark the cache complete last."""
from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.backends import BACKENDS, RowSource, RowWriter, create_segment, segment_path, zarr_chunk_path
from cache_schema.errors import (BackendMismatch, CacheError, ChecksumMismatch, CorruptCacheError, FingerprintMismatch,
                                 PartialCacheError)
from cache_schema.fingerprint import differing_fields, fingerprint, sha256_file
from cache_schema.layout import (FILES, MANIFEST, ROWS, SCHEMA_VERSION, SEGMENTS, SHA256, Row, as_rows, content_files,
                                 is_inside, is_int, json_bytes, parse_rows, read_json, required_files,
                                 valid_segment_name, with_schema, write_bytes_atomic, write_json_atomic)
from cache_schema.manifest import read_manifest


@dataclass
class Segment:
    name: str
    rows: list[Row]
    done: dict[int, dict[str, str]]   # local row -> {array: sha256 of its bytes as written} ({} in old hdf5 journals)
    sealed: dict | None = None        # hdf5: {"sha256", "bytes"} of the whole file, journaled once all rows were


class AgentCache:
    """A cache directory, for writing. Use `AgentCache.open(...)`, then `plan`, `write_segment`, `finalize`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._new_segments: list[tuple[str, list[Row]]] = []
        self._written: dict[str, str] = {}   # relative file -> sha256 of the bytes this process wrote there

    # ---------------------------------------------------------------- creation
    @classmethod
    def open(cls, cache_root, dataset: str, agent: str, fields: dict, arrays: dict[str, ArraySpec],
             backend: str = "zarr") -> "AgentCache":
        """Open or create the cache for these fields. An existing directory must agree on everything."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        full_fields = with_schema(fields)
        path = Path(cache_root) / dataset / agent / fingerprint(full_fields)
        array_dicts = {name: spec.to_dict() for name, spec in sorted(arrays.items())}
        manifest_path = path / MANIFEST
        if manifest_path.exists():
            manifest = read_manifest(manifest_path, versions=(SCHEMA_VERSION,))
            diff = differing_fields(full_fields, manifest["fields"])
            if diff:
                raise FingerprintMismatch(f"{path}: manifest fields differ from this run's: {', '.join(diff)}", diff)
            if manifest["backend"] != backend:
                raise BackendMismatch(f"{path} is a {manifest['backend']} cache; extract it with that backend, or "
                                      "into another cache root", manifest["backend"])
            diff = differing_fields(array_dicts, manifest["arrays"], "arrays")
            if diff:
                raise FingerprintMismatch(f"{path}: array shapes/dtypes differ from this run's: {', '.join(diff)}",
                                          diff)
            return cls(path, manifest)
        (path / SEGMENTS).mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": dataset,
            "agent": agent,
            "fingerprint": path.name,
            "fields": full_fields,
            "arrays": array_dicts,
            "backend": backend,
            "status": "partial",
            "created": {"by": _whoami(), "at": _now()},
            "segments": [],
            "rows": 0,
            "checksums": {},
            "provenance": {},
        }
        write_json_atomic(manifest_path, manifest)
        return cls(path, manifest)

    @property
    def arrays(self) -> dict[str, ArraySpec]:
        return {name: ArraySpec.from_dict(spec) for name, spec in self.manifest["arrays"].items()}

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def is_complete(self) -> bool:
        return self.manifest["status"] == "complete"

    # ---------------------------------------------------------------- segments on disk
    def segments(self) -> list[Segment]:
        """Segments whose row table exists, in name order, with their validated journals."""
        directory = self.path / SEGMENTS
        found = []
        for rows_file in sorted(directory.glob("seg-*.rows.json")):
            name = rows_file.name[: -len(".rows.json")]
            if not valid_segment_name(name):
                raise CorruptCacheError(f"{rows_file}: {name!r} is not a segment name (seg-NNNNN)")
            rows = parse_rows(read_json(rows_file), rows_file)
            done, sealed = self._journal(name, len(rows))
            found.append(Segment(name, rows, done, sealed))
        return found

    def _journal(self, name: str, size: int) -> tuple[dict[int, dict[str, str]], dict | None]:
        """{row: sha256 per array} of the journaled rows, and the hdf5 seal. A journal is trusted only whole: a row
        outside 0..size-1, a row twice or a line that is not an entry is an error naming the file and line (a
        segment that looks finished but is not would become a complete cache of zero rows). Only a torn last line
        (no newline: a kill or a full disk mid-write) is skipped: that row is not done."""
        journal = self.path / SEGMENTS / f"{name}.done.jsonl"
        try:
            data = journal.read_bytes()
        except FileNotFoundError:
            return {}, None
        lines = data.split(b"\n")[:-1]  # the part after the last newline is empty, or a torn line
        done, sealed = {}, None
        arrays = set(self.manifest["arrays"])
        legacy = self.manifest.get("schema_version") == 1
        for number, line in enumerate(lines, 1):
            where = f"{journal}:{number}"
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CorruptCacheError(f"{where}: not a journal entry (JSON object); the journal is damaged") from None
            if sealed is not None:
                raise CorruptCacheError(f"{where}: an entry after the segment's seal; the journal is damaged")
            if isinstance(entry, dict) and set(entry) == {"sealed"} and self.manifest["backend"] == "hdf5":
                sealed = entry["sealed"]
                if not (isinstance(sealed, dict) and isinstance(sealed.get("sha256"), str) and
                        SHA256.fullmatch(sealed["sha256"]) and is_int(sealed.get("bytes"))):
                    raise CorruptCacheError(f"{where}: a seal is {{sha256, bytes}}, got {sealed!r}")
                if len(done) != size:
                    raise CorruptCacheError(f"{where}: the segment is sealed with {size - len(done)} row(s) missing")
                continue
            if not isinstance(entry, dict) or "row" not in entry:
                raise CorruptCacheError(f"{where}: journal entry without 'row'; the journal is damaged")
            row = entry["row"]
            if not is_int(row) or not 0 <= row < size:
                raise CorruptCacheError(f"{where}: row {row!r} is not one of this segment's rows 0..{size - 1}")
            if row in done:
                raise CorruptCacheError(f"{where}: row {row} is journaled twice (two writers on one segment?)")
            sums = entry.get("sha256")
            if sums is None and legacy and isinstance(entry.get("files"), dict):  # schema 1: {chunk file: sha256}
                sums = {file.split("/")[2]: digest for file, digest in entry["files"].items()
                        if isinstance(file, str) and file.count("/") >= 2}
                if self.manifest["backend"] == "hdf5" and not sums:
                    done[row] = {}
                    continue
            if not (isinstance(sums, dict) and set(sums) == arrays and
                    all(isinstance(d, str) and SHA256.fullmatch(d) for d in sums.values())):
                raise CorruptCacheError(f"{where}: row {row} has no sha256 for each of the arrays {sorted(arrays)}")
            done[row] = sums
        return done, sealed

    def done_rows(self) -> set[Row]:
        return {segment.rows[i] for segment in self.segments() for i in segment.done}

    def plan(self, needed: list[Row], world_size: int = 1) -> dict[int, list[tuple[str, list[int]]]]:
        """Which segment rows each rank computes: unfinished rows of existing segments, then new segments.

        Deterministic for a given disk state, so every rank computes the same plan. New segments are only
        described here; `create_segments` (rank 0) makes them. Returns {rank: [(segment name, local rows)]}.
        """
        needed = sorted(set(as_rows(needed)))
        segments = self.segments()
        planned = {row for segment in segments for row in segment.rows}
        assignment: dict[int, list[tuple[str, list[int]]]] = {rank: [] for rank in range(world_size)}
        unfinished = [s for s in segments if not _finished(s)]
        for index, segment in enumerate(unfinished):
            todo = [i for i in range(len(segment.rows)) if i not in segment.done]
            assignment[index % world_size].append((segment.name, todo))
        new_rows = [row for row in needed if row not in planned]
        self._new_segments = []
        if new_rows:
            next_index = 1 + max((int(s.name.split("-")[1]) for s in segments), default=-1)
            for rank, part in enumerate(np.array_split(np.arange(len(new_rows)), world_size)):
                if len(part) == 0:
                    continue
                name = f"seg-{next_index:05d}"
                next_index += 1
                rows = [new_rows[i] for i in part]
                self._new_segments.append((name, rows))
                assignment[rank].append((name, list(range(len(rows)))))
        return assignment

    def create_segments(self, verify_existing: bool = True) -> None:
        """Create the new segments of the last `plan` (one process only). The row table is written last.

        First, the files the manifest already lists are verified against their checksums (`verify_existing`), so
        rows are never added to, and a damaged file never re-listed in, a cache that changed since it was
        complete. A segment that exists (its row table does) is never recreated: another writer made it after this
        plan, and recreating it would give its rows to this plan's keys."""
        taken = [name for name, _ in self._new_segments if (self.path / SEGMENTS / f"{name}.rows.json").exists()]
        if taken:
            raise CacheError(f"{self.path}: segment(s) {', '.join(taken)} appeared after this run planned them: "
                             "another writer is using this cache (one writer per cache); nothing was overwritten")
        if verify_existing:
            self.check_recorded()
        if self.manifest["status"] == "complete" and self._new_segments:
            self._set_status("partial")
        for name, rows in self._new_segments:
            create_segment(segment_path(self.path / SEGMENTS, name, self.backend), len(rows), self.arrays,
                           self.backend)
            write_json_atomic(self.path / SEGMENTS / f"{name}.rows.json", [list(row) for row in rows])
        self._new_segments = []

    def segment_writer(self, name: str) -> "SegmentWriter":
        if not valid_segment_name(name):
            raise ValueError(f"{name!r} is not a segment name")
        rows_file = self.path / SEGMENTS / f"{name}.rows.json"
        return SegmentWriter(self, name, parse_rows(read_json(rows_file), rows_file))

    def check_recorded(self) -> None:
        """Every file the manifest lists still has its recorded sha256 (else CorruptCacheError naming it)."""
        for relative, digest in sorted(self.manifest["checksums"].items()):
            file = self.path / relative
            if file.is_symlink() or not file.is_file():
                raise ChecksumMismatch(f"{self.path}: {relative} is listed in the manifest but missing; nothing was "
                                       "added. Restore the cache (pull it again) or delete it and re-extract")
            if sha256_file(file) != digest:
                raise ChecksumMismatch(f"{self.path}: {relative} differs from its recorded checksum (damaged or "
                                       "edited); nothing was added. Restore the cache (pull it again) or delete it "
                                       "and re-extract")

    def seal(self, segment: Segment) -> dict:
        """Hash a finished hdf5 segment once: each row is first checked against the sha256 journaled when it was
        written, then the whole file (h5py's metadata included) is hashed and the digest journaled as the last
        line. `finalize` takes the digest from there; nothing re-hashes the file to list it."""
        path = segment_path(self.path / SEGMENTS, segment.name, self.backend)
        journal = self.path / SEGMENTS / f"{segment.name}.done.jsonl"
        source = RowSource(path, self.arrays, self.backend, len(segment.rows))
        for row, sums in sorted(segment.done.items()):
            for name, digest in sums.items():
                if hashlib.sha256(source.row_bytes(name, row)).hexdigest() != digest:
                    raise CorruptCacheError(f"{path}: row {row} of array {name!r} is not the bytes that were written "
                                            f"(their sha256 is in {journal.name}); the segment is damaged, re-extract")
        sealed = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        repair_torn_tail(journal)
        with open(journal, "a") as handle:
            handle.write(json.dumps({"sealed": sealed}, sort_keys=True) + "\n")
        segment.sealed = sealed
        return sealed

    # ---------------------------------------------------------------- extra files and finishing
    def add_file(self, name: str, data: bytes) -> None:
        if not is_inside(name):
            raise ValueError(f"extra file name {name!r} must be a relative path inside {FILES}/")
        target = self.path / FILES / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        self._written[f"{FILES}/{name}"] = hashlib.sha256(data).hexdigest()

    def set_provenance(self, key: str, value) -> None:
        """Facts that do not change the numbers' identity but are worth keeping (e.g. the resolved hub commit)."""
        self.manifest.setdefault("provenance", {})[key] = value
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def finalize(self) -> dict:
        """Check every planned row is journaled, write the row table and checksums, then status=complete (last).

        Every file of the cache is listed (`content_files`). A checksum comes from what this code wrote (zarr
        chunks: the row's journaled sha256; hdf5 segments: their seal; the row table and extra files: the bytes
        just written) or, for files the manifest listed before, from that record, verified by `create_segments`;
        only files new to this run (row tables of new segments, journals, zarr metadata) are hashed from disk."""
        segments = self.segments()
        unfinished = {s.name: len(s.rows) - len(s.done) for s in segments if not _finished(s)}
        if unfinished:
            raise PartialCacheError(f"{self.path}: rows still missing in segments {unfinished}; re-run extract")
        all_rows = [row for segment in segments for row in segment.rows]
        if len(set(all_rows)) != len(all_rows):
            raise CorruptCacheError(f"{self.path}: a (key, view) row appears in two segments")
        known = {}
        specs = self.arrays
        for segment in segments:
            data_path = segment_path(self.path / SEGMENTS, segment.name, self.backend)
            if self.backend == "hdf5":
                known[data_path.relative_to(self.path).as_posix()] = (segment.sealed or self.seal(segment))["sha256"]
                continue
            for row, sums in segment.done.items():
                for name, digest in sums.items():
                    known[zarr_chunk_path(data_path, name, row, specs[name]).relative_to(self.path).as_posix()] = digest
        table = json_bytes([list(row) for row in all_rows])
        write_bytes_atomic(self.path / ROWS, table)
        known[ROWS] = hashlib.sha256(table).hexdigest()
        recorded = self.manifest["checksums"]
        present = content_files(self.path)
        expected = required_files({**self.manifest, "segments": [{"name": s.name, "rows": len(s.rows)}
                                                                   for s in segments]})
        missing = sorted(expected - set(present))
        if missing:
            raise CorruptCacheError(f"{self.path}: {missing[0]} is missing" +
                                    (f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else "") +
                                    "; the cache is damaged, re-extract")
        checksums = {}
        for relative in present:
            checksums[relative] = (known.get(relative) or self._written.get(relative) or recorded.get(relative)
                                   or sha256_file(self.path / relative))
        self.manifest.update(segments=[{"name": s.name, "rows": len(s.rows)} for s in segments],
                             rows=len(all_rows), checksums=checksums, status="complete", completed_at=_now())
        write_json_atomic(self.path / MANIFEST, self.manifest)
        return self.manifest

    def _set_status(self, status: str) -> None:
        self.manifest["status"] = status
        write_json_atomic(self.path / MANIFEST, self.manifest)


def _finished(segment: Segment) -> bool:
    return set(segment.done) == set(range(len(segment.rows)))


def repair_torn_tail(journal: Path) -> None:
    """Cut a torn last line (no newline: a kill or a full disk mid-write) so the next entry starts a line of its
    own; that row is written again."""
    try:
        with open(journal, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


class SegmentWriter:
    """Writes rows into one segment and journals each finished row with the sha256 of its bytes as written. Rows
    already done are refused. Closing a finished hdf5 segment seals it (`AgentCache.seal`)."""

    def __init__(self, cache: AgentCache, name: str, rows: list[Row]):
        self.cache, self.name, self.rows = cache, name, rows
        self._path = segment_path(cache.path / SEGMENTS, name, cache.backend)
        journal = cache.path / SEGMENTS / f"{name}.done.jsonl"
        repair_torn_tail(journal)
        self._done, self._sealed = cache._journal(name, len(rows))
        self._writer = RowWriter(self._path, cache.arrays, cache.backend)
        self._journal = open(journal, "a")

    def write(self, local_rows, arrays: dict[str, np.ndarray]) -> None:
        """arrays[name][i] is the row local_rows[i]; every array of the cache must be given."""
        specs = self.cache.arrays
        if set(arrays) != set(specs):
            raise ValueError(f"segment {self.name}: got arrays {sorted(arrays)}, cache has {sorted(specs)}")
        for i, row in enumerate(local_rows):
            row = int(row)
            if not 0 <= row < len(self.rows) or row in self._done:
                raise ValueError(f"segment {self.name}: row {row} is already written or not one of its rows")
            sums = self._writer.write_row(row, {name: arrays[name][i] for name in specs})
            self._journal.write(json.dumps({"row": row, "sha256": sums}, sort_keys=True) + "\n")
            self._journal.flush()
            self._done[row] = sums

    def close(self, seal: bool = True) -> None:
        self._writer.close()
        self._journal.close()
        if seal and self.cache.backend == "hdf5" and self._sealed is None and len(self._done) == len(self.rows):
            self._sealed = self.cache.seal(Segment(self.name, self.rows, self._done))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(seal=exc[0] is None)


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

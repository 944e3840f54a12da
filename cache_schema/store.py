"""One agent's cache: `<cache_root>/<dataset>/<agent>/<fingerprint>/`.

    manifest.json                 schema version, fields (everything hashed), arrays, backend, status, checksums
    rows.json                     global row table [[key, view id], ...] (written when complete)
    segments/seg-00000.rows.json  the rows planned for one segment; the segment exists once this file does
    segments/seg-00000.zarr|.h5   its arrays
    segments/seg-00000.done.jsonl journal: one line per finished row with the sha256 of each array's row bytes as
                                  written; an hdf5 segment's last line seals it with the sha256 of the whole file
    files/<name>                  extra files (e.g. descriptions.json)

A run plans the rows it needs, resumes segments that a killed run left unfinished, puts new rows in new segments
(one writer per segment), and marks the cache complete last, atomically. Rows are found by (key, view id), never by
position.

Every file here may come from another machine, so everything read is validated and names only paths inside the
cache. Checksums catch accidents and careless edits (the manifest itself is not signed). Rows and hdf5 segments get
theirs from the bytes as written (journal lines, seals); a file already listed is verified against its recorded
checksum before rows are added, never re-hashed to be adopted. Schema 2 lists every file of a complete cache in
`checksums`; schema-1 caches (which left the journals and each zarr segment's group `zarr.json` unlisted) are still
read, with those files as their allowance.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cache_schema.arrays import DTYPES, ArraySpec
from cache_schema.backends import BACKENDS, RowSource, RowWriter, create_segment, segment_path, zarr_chunk_path
from cache_schema.errors import (CacheError, CorruptCacheError, FingerprintMismatch, MissingRowsError,
                                 PartialCacheError, SchemaVersionError)
from cache_schema.fingerprint import differing_fields, fingerprint, sha256_file

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 1: journals and zarr group metadata unlisted (see `schema_1_allowance`)
MANIFEST = "manifest.json"
ROWS = "rows.json"
SEGMENTS = "segments"
FILES = "files"
READERS = ".readers"
# Top-level entries of a cache directory that are not part of the cache: reader leases and the writer lock.
NOT_CONTENT = (READERS, ".writer")
LOCK_PREFIXES = (".lock", "writer.lock")
SEGMENT_NAME = re.compile(r"seg-[0-9]{5,}")
ARRAY_NAME = re.compile(r"[A-Za-z0-9_]+")
SHA256 = re.compile(r"[0-9a-f]{64}")

Row = tuple[str, int]


def cache_dir(cache_root, dataset: str, agent: str, fields: dict) -> Path:
    """Where the cache for these fields lives; computable before any model is loaded."""
    return Path(cache_root) / dataset / agent / fingerprint(with_schema(fields))


def with_schema(fields: dict) -> dict:
    return {**fields, "schema_version": SCHEMA_VERSION}


def write_json_atomic(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def _json_bytes(data) -> bytes:
    """What `write_json_atomic` writes, so a file's checksum can be taken from the bytes instead of the disk."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def read_json(path: Path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{path} is not valid JSON ({error}); the cache is damaged") from None


def parse_json(data: bytes, where):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{where} is not valid JSON ({error}); the cache is damaged") from None


def _as_rows(rows) -> list[Row]:
    return [(str(key), int(view)) for key, view in rows]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_rows(data, where) -> list[Row]:
    """A row table from disk: a JSON list of [key, view id] pairs."""
    if not isinstance(data, list):
        raise CorruptCacheError(f"{where}: a row table is a list of [key, view id] pairs, not {_kind(data)}")
    for i, item in enumerate(data):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and _is_int(item[1])):
            raise CorruptCacheError(f"{where}: entry {i} is {item!r}, not a [key, view id] pair")
    return [(key, view) for key, view in data]


def is_inside(relative) -> bool:
    """A relative POSIX path that stays inside the cache directory (no absolute path, `..`, backslash or empty part)."""
    if not isinstance(relative, str) or not relative or "\\" in relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


def valid_segment_name(name) -> bool:
    """`seg-00000`: segment names become file names, so nothing else (no separators, no `..`)."""
    return isinstance(name, str) and SEGMENT_NAME.fullmatch(name) is not None


def manifest_problem(manifest) -> str | None:
    """What makes this JSON value unusable as a manifest (None: nothing); the schema version is checked apart."""
    if not isinstance(manifest, dict):
        return f"it is {_kind(manifest)}, not an object"
    kinds = (("dataset", str), ("agent", str), ("fingerprint", str), ("fields", dict), ("arrays", dict),
             ("backend", str), ("status", str), ("segments", list), ("rows", int), ("checksums", dict))
    for key, kind in kinds:
        if key not in manifest:
            return f"field {key!r} is missing"
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and not _is_int(value)):
            return f"field {key!r} is {_kind(value)}, not {_kind(kind())}"
    if manifest["backend"] not in BACKENDS:
        return f"backend {manifest['backend']!r} is not one of {', '.join(BACKENDS)}"
    if manifest["status"] not in ("partial", "complete"):
        return f"status {manifest['status']!r} is neither 'partial' nor 'complete'"
    for name, spec in manifest["arrays"].items():
        if not ARRAY_NAME.fullmatch(name):
            return f"array name {name!r} is not a plain name"
        if not (isinstance(spec, dict) and spec.get("dtype") in DTYPES and isinstance(spec.get("row_shape"), list)
                and all(_is_int(d) and d >= 0 for d in spec["row_shape"])):
            return f"arrays.{name} is {spec!r}, not {{row_shape: [sizes], dtype: one of {', '.join(DTYPES)}}}"
    names = set()
    for i, segment in enumerate(manifest["segments"]):
        if not (isinstance(segment, dict) and valid_segment_name(segment.get("name")) and
                _is_int(segment.get("rows")) and segment["rows"] >= 0):
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
        raise CorruptCacheError(f"{where}: not a cache manifest (it is {_kind(manifest)}, not an object)")
    check_schema(manifest, where, versions)
    problem = manifest_problem(manifest)
    if problem:
        raise CorruptCacheError(f"{where}: not a valid cache manifest: {problem}")
    return manifest


def read_manifest(path: Path, versions=READABLE_SCHEMAS) -> dict:
    return check_manifest(read_json(path), path, versions)


def content_files(path) -> list[str]:
    """Every file of a cache directory (relative POSIX paths, sorted) that a complete manifest must list: all but
    manifest.json, the reader leases, the writer lock (`.writer/`, `.lock*`, `writer.lock*`) and `*.tmp`
    temporaries. Links and special files are included, so that `verify` can name them."""
    path = Path(path)
    found = []
    for directory, dirnames, filenames in os.walk(path):
        base = Path(directory)
        top = base == path
        keep = []
        for name in dirnames:
            if name.endswith(".tmp") or (top and _not_content(name)):
                continue
            if os.path.islink(base / name):  # a link to a directory: reported, never followed
                filenames.append(name)
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.endswith(".tmp") or (top and (name == MANIFEST or _not_content(name))):
                continue
            found.append((base / name).relative_to(path).as_posix())
    return sorted(found)


def _not_content(top_level_name: str) -> bool:
    return top_level_name in NOT_CONTENT or top_level_name.startswith(LOCK_PREFIXES)


def required_files(manifest: dict) -> set[str]:
    """The files a complete cache of this manifest cannot lack (its checksums must list them)."""
    arrays = {name: ArraySpec.from_dict(spec) for name, spec in manifest["arrays"].items()}
    required = {ROWS}
    for segment in manifest["segments"]:
        name, rows = segment["name"], segment["rows"]
        required.add(f"{SEGMENTS}/{name}.rows.json")
        if manifest["schema_version"] >= 2:
            required.add(f"{SEGMENTS}/{name}.done.jsonl")
        if manifest["backend"] == "hdf5":
            required.add(f"{SEGMENTS}/{name}.h5")
            continue
        if manifest["schema_version"] >= 2:
            required.add(f"{SEGMENTS}/{name}.zarr/zarr.json")
        for array, spec in arrays.items():
            required.add(f"{SEGMENTS}/{name}.zarr/{array}/zarr.json")
            required.update(zarr_chunk_path(PurePosixPath(SEGMENTS, f"{name}.zarr"), array, row, spec).as_posix()
                            for row in range(rows))
    return required


def schema_1_allowance(manifest: dict) -> set[str]:
    """Files a schema-1 cache has without listing them: its journals and each zarr segment's group metadata."""
    if manifest["schema_version"] != 1:
        return set()
    allowed = set()
    for segment in manifest["segments"]:
        allowed.add(f"{SEGMENTS}/{segment['name']}.done.jsonl")
        if manifest["backend"] == "zarr":
            allowed.add(f"{SEGMENTS}/{segment['name']}.zarr/zarr.json")
    return allowed


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
                raise CacheError(f"{path} is a {manifest['backend']} cache; re-run with --backend "
                                 f"{manifest['backend']} or use another --cache-root")
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
                        SHA256.fullmatch(sealed["sha256"]) and _is_int(sealed.get("bytes"))):
                    raise CorruptCacheError(f"{where}: a seal is {{sha256, bytes}}, got {sealed!r}")
                if len(done) != size:
                    raise CorruptCacheError(f"{where}: the segment is sealed with {size - len(done)} row(s) missing")
                continue
            if not isinstance(entry, dict) or "row" not in entry:
                raise CorruptCacheError(f"{where}: journal entry without 'row'; the journal is damaged")
            row = entry["row"]
            if not _is_int(row) or not 0 <= row < size:
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
        needed = sorted(set(_as_rows(needed)))
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
                raise CorruptCacheError(f"{self.path}: {relative} is listed in the manifest but missing; nothing was "
                                        "added. Restore the cache (pull it again) or delete it and re-extract")
            if sha256_file(file) != digest:
                raise CorruptCacheError(f"{self.path}: {relative} differs from its recorded checksum (damaged or "
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
        table = _json_bytes([list(row) for row in all_rows])
        _write_bytes_atomic(self.path / ROWS, table)
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
            written = self._writer.write_row(row, {name: arrays[name][i] for name in specs})
            sums = {name: hashlib.sha256(raw).hexdigest() for name, raw in written.items()}
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


def check_schema(manifest: dict, where, versions=READABLE_SCHEMAS) -> None:
    version = manifest.get("schema_version")
    readable = " and ".join(str(v) for v in versions)
    if "schema_version" not in manifest:
        raise SchemaVersionError(f"{where}: no schema_version; not a cache manifest this code reads "
                                 f"(cache schema {readable})")
    if not _is_int(version):
        raise SchemaVersionError(f"{where}: schema_version is {version!r} ({_kind(version)}); it must be an integer "
                                 f"(this code reads cache schema {readable})")
    if version not in versions:
        raise SchemaVersionError(f"{where}: cache schema version {version}, this code reads {readable}; "
                                 "re-extract, or use the release that wrote it")


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class CacheReader:
    """Stage-2 view of a complete cache: small arrays in RAM, large ones served from memmaps, rows by key.

    Opening checks what is cheap: the manifest's shape, the row table against its checksum (a swapped entry would
    attach teachers to the wrong images), the row counts, every listed file's presence (and each zarr chunk's
    size), and each array's own metadata against the manifest's dtype and shape. A flipped byte inside a row is
    `verify`'s to find: hashing every row on every open would read the whole cache each time."""

    def __init__(self, path, memmap_arrays: tuple[str, ...] = ("tokens",)):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise CacheError(f"{self.path}: no {MANIFEST}; not a cache directory")
        self.manifest = read_manifest(manifest_path)
        if self.manifest["status"] != "complete":
            raise PartialCacheError(f"{self.path} is partial (an extraction was interrupted or is running); "
                                    "re-run `transagent extract` with the same options to finish it")
        self.agent = self.manifest["agent"]
        self.arrays = {name: ArraySpec.from_dict(spec) for name, spec in self.manifest["arrays"].items()}
        self.rows = read_row_table(self.path, self.manifest)
        self._check_files()
        self._sources, self._location = [], {}
        for number, segment in enumerate(self.manifest["segments"]):
            check_array_metadata(self.path, self.manifest, segment)
            source = RowSource(segment_path(self.path / SEGMENTS, segment["name"], self.manifest["backend"]),
                               self.arrays, self.manifest["backend"], segment["rows"])
            self._sources.append(source)
        offset = 0
        for number, segment in enumerate(self.manifest["segments"]):
            for local in range(segment["rows"]):
                self._location[self.rows[offset + local]] = (number, local)
            offset += segment["rows"]
        self.index = {row: i for i, row in enumerate(self.rows)}
        self._in_ram = {name: self._read_all(name) for name in self.arrays if name not in memmap_arrays}

    def _check_files(self) -> None:
        """Cheap completeness check (existence and size); `verify` hashes everything."""
        for relative in self.manifest["checksums"]:
            file = self.path / relative
            if file.is_symlink() or not file.is_file():
                raise CorruptCacheError(f"{self.path}: file {relative} listed in the manifest is missing (or not a "
                                        "plain file)")
        for relative, spec in self._chunk_sizes():
            size = (self.path / relative).stat().st_size
            if size != spec:
                raise CorruptCacheError(f"{self.path}: {relative} has {size} bytes, expected {spec} (truncated?)")

    def _chunk_sizes(self):
        if self.manifest["backend"] != "zarr":
            return
        for relative in self.manifest["checksums"]:
            parts = relative.split("/")
            if len(parts) > 3 and parts[0] == SEGMENTS and parts[3] == "c" and parts[2] in self.arrays:
                yield relative, self.arrays[parts[2]].row_bytes

    def _read_all(self, name: str) -> np.ndarray:
        return np.concatenate([source.read_all(name) for source in self._sources]) if self._sources else \
            np.empty((0, *self.arrays[name].row_shape), dtype=self.arrays[name].numpy_dtype)

    def has(self, row: Row) -> bool:
        return (str(row[0]), int(row[1])) in self._location

    def missing(self, rows) -> list[Row]:
        return [row for row in _as_rows(rows) if row not in self._location]

    def read(self, name: str, rows) -> np.ndarray:
        """Rows of array `name` for the given (key, view id) pairs, in that order."""
        rows = _as_rows(rows)
        missing = self.missing(rows)
        if missing:
            raise MissingRowsError(f"{self.path}: {len(missing)} row(s) of agent {self.agent!r} are not cached, "
                                   f"e.g. {missing[:5]}", self.agent, missing)
        if name in self._in_ram:
            return self._in_ram[name][[self.index[row] for row in rows]]
        spec = self.arrays[name]
        out = np.empty((len(rows), *spec.row_shape), dtype=spec.numpy_dtype)
        by_segment: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_segment.setdefault(self._location[row][0], []).append(i)
        for number, positions in by_segment.items():
            local = np.array([self._location[rows[i]][1] for i in positions])
            if len(positions) == len(rows):
                self._sources[number].read(name, local, out)
            else:
                part = np.empty((len(positions), *spec.row_shape), dtype=spec.numpy_dtype)
                self._sources[number].read(name, local, part)
                out[positions] = part
        return out

    def load(self, name: str) -> np.ndarray:
        """A whole array in row order (for small arrays: class features, scores)."""
        return self._in_ram[name] if name in self._in_ram else self._read_all(name)

    def file(self, name: str) -> bytes:
        return (self.path / FILES / name).read_bytes()


def read_row_table(path: Path, manifest: dict) -> list[Row]:
    """rows.json, checked against its checksum and against the manifest's row counts."""
    where = path / ROWS
    digest = manifest["checksums"].get(ROWS)
    if digest is None:
        raise CorruptCacheError(f"{path}: {ROWS} is not listed in the manifest's checksums; the cache is damaged")
    try:
        data = where.read_bytes()
    except FileNotFoundError:
        raise CorruptCacheError(f"{path}: {ROWS} is missing; the cache is damaged") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptCacheError(f"{where} does not match its checksum in {MANIFEST} (edited or damaged: its rows "
                                "could be attached to the wrong images); `transagent cache verify`, then pull or "
                                "re-extract the cache")
    rows = parse_rows(parse_json(data, where), where)
    counted = sum(segment["rows"] for segment in manifest["segments"])
    if not counted == manifest["rows"] == len(rows):
        raise CorruptCacheError(f"{path}: {MANIFEST} counts {counted} row(s) in its segments and {manifest['rows']} "
                                f"in 'rows', {ROWS} holds {len(rows)}; the cache is damaged")
    if len(set(rows)) != len(rows):
        raise CorruptCacheError(f"{where}: a (key, view id) row appears twice; the cache is damaged")
    return rows


def check_array_metadata(path: Path, manifest: dict, segment: dict) -> None:
    """A zarr segment's own array metadata (zarr.json, checksummed) agrees with the manifest; the hdf5 datasets'
    dtype and shape are checked where the segment is opened (`RowSource`)."""
    if manifest["backend"] != "zarr":
        return
    from cache_schema.backends import zarr_metadata_problem

    for name, spec in manifest["arrays"].items():
        relative = f"{SEGMENTS}/{segment['name']}.zarr/{name}/zarr.json"
        try:
            data = (path / relative).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptCacheError(f"{path}: {relative} is missing; the cache is damaged") from None
        digest = manifest["checksums"].get(relative)
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise CorruptCacheError(f"{path}: {relative} does not match its checksum in {MANIFEST} (edited or "
                                    "damaged); `transagent cache verify`")
        problem = zarr_metadata_problem(parse_json(data, path / relative), ArraySpec.from_dict(spec),
                                        segment["rows"])
        if problem:
            raise CorruptCacheError(f"{path / relative}: {problem}; the manifest or the segment was edited")


def verify(path) -> list[str]:
    """Every problem with a cache directory (empty list = good): schema, status, fingerprint, files listed but
    absent or altered, files present but not listed, and (when every file is intact) the manifest against the
    row table and the arrays' own metadata."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return [f"{path}: no {MANIFEST}"]
    try:
        manifest = read_manifest(manifest_path)
    except CacheError as error:
        return [str(error)]
    problems = []
    complete = manifest["status"] == "complete"
    if not complete:
        problems.append(f"{path}: status is {manifest['status']!r}, not 'complete'")
    if manifest["fingerprint"] != path.name:
        problems.append(f"{path}: the manifest's fingerprint is {manifest['fingerprint']}, the directory's name is "
                        f"{path.name}")
    expected_fp = fingerprint(manifest["fields"])
    if expected_fp != path.name:
        problems.append(f"{path}: the manifest's fields hash to fingerprint {expected_fp}, the directory's name is "
                        f"{path.name} (fields edited?)")
    listed = manifest["checksums"]
    for relative, checksum in sorted(listed.items()):
        file = path / relative
        if file.is_symlink() or not file.is_file():
            problems.append(f"{path}: missing file {relative} (listed in the manifest, absent or not a plain file)")
        elif sha256_file(file) != checksum:
            problems.append(f"{path}: checksum mismatch in {relative}")
    if not complete:
        return problems
    present = set(content_files(path))
    for relative in sorted(present - set(listed) - schema_1_allowance(manifest)):
        problems.append(f"{path}: file {relative} is present but not listed in the manifest's checksums")
    for relative in sorted(required_files(manifest) - set(listed) - present):
        problems.append(f"{path}: missing file {relative} (and not listed in the manifest's checksums)")
    if not problems:
        try:
            read_row_table(path, manifest)
            for segment in manifest["segments"]:
                check_array_metadata(path, manifest, segment)
                RowSource(segment_path(path / SEGMENTS, segment["name"], manifest["backend"]),
                          {name: ArraySpec.from_dict(spec) for name, spec in manifest["arrays"].items()},
                          manifest["backend"], segment["rows"])
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
        raise CacheError(f"no cache for agent {agent!r} on dataset {dataset!r} under {cache_root}{suffix}")
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
        raise CacheError(f"several complete caches of agent {agent!r} match: "
                         f"{', '.join(p.name for p, _ in complete)}; pin one with --cache-fingerprint {agent}=<fp>")
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

"""One agent's cache: `<cache_root>/<dataset>/<agent>/<fingerprint>/`.

    manifest.json                 schema version, fields (everything hashed), arrays, backend, status, checksums
    rows.json                     global row table [[key, view id], ...] (written when complete)
    segments/seg-00000.rows.json  the rows planned for one segment; the segment exists once this file does
    segments/seg-00000.zarr|.h5   its arrays
    segments/seg-00000.done.jsonl journal: one line per finished row (+ sha256 of its chunk files for zarr)
    files/<name>                  extra files (e.g. descriptions.json)

A run plans the rows it needs, resumes segments that a killed run left unfinished, puts new rows in new segments
(one writer per segment), and marks the cache complete last, atomically. Rows are found by (key, view id), never by
position.
"""
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
from cache_schema.backends import BACKENDS, RowSource, RowWriter, create_segment, segment_path
from cache_schema.errors import (CacheError, CorruptCacheError, FingerprintMismatch, MissingRowsError,
                                 PartialCacheError, SchemaVersionError)
from cache_schema.fingerprint import differing_fields, fingerprint, sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROWS = "rows.json"
SEGMENTS = "segments"
FILES = "files"

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


def read_json(path: Path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise CorruptCacheError(f"{path} is not valid JSON ({error}); the cache is damaged") from None


def _as_rows(rows) -> list[Row]:
    return [(str(key), int(view)) for key, view in rows]


@dataclass
class Segment:
    name: str
    rows: list[Row]
    done: dict[int, dict[str, str]]   # local row -> {relative file: sha256} (empty dict for hdf5)


class AgentCache:
    """A cache directory, for writing. Use `AgentCache.open(...)`, then `plan`, `write_segment`, `finalize`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._new_segments: list[tuple[str, list[Row]]] = []

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
            manifest = read_json(manifest_path)
            check_schema(manifest, manifest_path)
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
        """Segments whose row table exists, in name order; damaged leftovers of killed creations are removed."""
        directory = self.path / SEGMENTS
        found = []
        for rows_file in sorted(directory.glob("seg-*.rows.json")):
            name = rows_file.name[: -len(".rows.json")]
            found.append(Segment(name, _as_rows(read_json(rows_file)), self._journal(name)))
        return found

    def _journal(self, name: str) -> dict[int, dict[str, str]]:
        journal = self.path / SEGMENTS / f"{name}.done.jsonl"
        done = {}
        if journal.exists():
            with open(journal) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill: that row is simply not done
                    done[int(entry["row"])] = entry.get("files", {})
        return done

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
        unfinished = [s for s in segments if len(s.done) < len(s.rows)]
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

    def create_segments(self) -> None:
        """Create the new segments of the last `plan` (one process only). The row table is written last.

        A segment that exists (its row table does) is never recreated: another writer made it after this plan, and
        recreating it would give its rows to this plan's keys. Arrays without a row table are a killed creation's
        leftover and are replaced."""
        taken = [name for name, _ in self._new_segments if (self.path / SEGMENTS / f"{name}.rows.json").exists()]
        if taken:
            raise CacheError(f"{self.path}: segment(s) {', '.join(taken)} appeared after this run planned them: "
                             "another writer is using this cache (one writer per cache); nothing was overwritten")
        if self.manifest["status"] == "complete" and self._new_segments:
            self._set_status("partial")
        for name, rows in self._new_segments:
            create_segment(segment_path(self.path / SEGMENTS, name, self.backend), len(rows), self.arrays,
                           self.backend)
            write_json_atomic(self.path / SEGMENTS / f"{name}.rows.json", [list(row) for row in rows])
        self._new_segments = []

    def segment_writer(self, name: str) -> "SegmentWriter":
        rows = _as_rows(read_json(self.path / SEGMENTS / f"{name}.rows.json"))
        return SegmentWriter(self, name, rows)

    # ---------------------------------------------------------------- extra files and finishing
    def add_file(self, name: str, data: bytes) -> None:
        target = self.path / FILES / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)

    def set_provenance(self, key: str, value) -> None:
        """Facts that do not change the numbers' identity but are worth keeping (e.g. the resolved hub commit)."""
        self.manifest.setdefault("provenance", {})[key] = value
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def finalize(self) -> dict:
        """Check every planned row is done, write the row table and checksums, then status=complete (last)."""
        segments = self.segments()
        unfinished = {s.name: len(s.rows) - len(s.done) for s in segments if len(s.done) < len(s.rows)}
        if unfinished:
            raise PartialCacheError(f"{self.path}: rows still missing in segments {unfinished}; re-run extract")
        all_rows = [row for segment in segments for row in segment.rows]
        if len(set(all_rows)) != len(all_rows):
            raise CorruptCacheError(f"{self.path}: a (key, view) row appears in two segments")
        write_json_atomic(self.path / ROWS, [list(row) for row in all_rows])
        checksums = {}
        for segment in segments:
            source = RowSource(segment_path(self.path / SEGMENTS, segment.name, self.backend), self.arrays,
                               self.backend, len(segment.rows))
            journal_sums = {f: s for files in segment.done.values() for f, s in files.items()}
            for file in source.files():
                relative = file.relative_to(self.path).as_posix()
                checksums[relative] = journal_sums.get(relative) or sha256_file(file)
            checksums[f"{SEGMENTS}/{segment.name}.rows.json"] = sha256_file(
                self.path / SEGMENTS / f"{segment.name}.rows.json")
        for file in sorted((self.path / FILES).rglob("*")) if (self.path / FILES).exists() else []:
            if file.is_file() and not file.name.endswith(".tmp"):
                checksums[file.relative_to(self.path).as_posix()] = sha256_file(file)
        checksums[ROWS] = sha256_file(self.path / ROWS)
        self.manifest.update(segments=[{"name": s.name, "rows": len(s.rows)} for s in segments],
                             rows=len(all_rows), checksums=checksums, status="complete", completed_at=_now())
        write_json_atomic(self.path / MANIFEST, self.manifest)
        return self.manifest

    def _set_status(self, status: str) -> None:
        self.manifest["status"] = status
        write_json_atomic(self.path / MANIFEST, self.manifest)


class SegmentWriter:
    """Writes rows into one segment and journals each finished row. Rows already done are skipped."""

    def __init__(self, cache: AgentCache, name: str, rows: list[Row]):
        self.cache, self.name, self.rows = cache, name, rows
        self._path = segment_path(cache.path / SEGMENTS, name, cache.backend)
        self._writer = RowWriter(self._path, cache.arrays, cache.backend)
        self._journal = open(cache.path / SEGMENTS / f"{name}.done.jsonl", "a")

    def write(self, local_rows, arrays: dict[str, np.ndarray]) -> None:
        """arrays[name][i] is the row local_rows[i]; every array of the cache must be given."""
        specs = self.cache.arrays
        if set(arrays) != set(specs):
            raise ValueError(f"segment {self.name}: got arrays {sorted(arrays)}, cache has {sorted(specs)}")
        for i, row in enumerate(local_rows):
            written = self._writer.write_row(int(row), {name: arrays[name][i] for name in specs})
            files = {}
            if self.cache.backend == "zarr":
                from cache_schema.backends import zarr_chunk_path

                for name, raw in written.items():
                    file = zarr_chunk_path(self._path, name, int(row), specs[name])
                    files[file.relative_to(self.cache.path).as_posix()] = hashlib.sha256(raw).hexdigest()
            self._journal.write(json.dumps({"row": int(row), "files": files}) + "\n")
            self._journal.flush()

    def close(self) -> None:
        self._writer.close()
        self._journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_schema(manifest: dict, where) -> None:
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(f"{where}: cache schema version {version}, this code reads {SCHEMA_VERSION}; "
                                 "re-extract, or use the release that wrote it")


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class CacheReader:
    """Stage-2 view of a complete cache: small arrays in RAM, large ones served from memmaps, rows by key."""

    def __init__(self, path, memmap_arrays: tuple[str, ...] = ("tokens",)):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise CacheError(f"{self.path}: no {MANIFEST}; not a cache directory")
        self.manifest = read_json(manifest_path)
        check_schema(self.manifest, manifest_path)
        if self.manifest["status"] != "complete":
            raise PartialCacheError(f"{self.path} is partial (an extraction was interrupted or is running); "
                                    "re-run `transagent extract` with the same options to finish it")
        self.agent = self.manifest["agent"]
        self.arrays = {name: ArraySpec.from_dict(spec) for name, spec in self.manifest["arrays"].items()}
        self.rows = _as_rows(read_json(self.path / ROWS))
        self._check_files()
        self._sources, self._location = [], {}
        for number, segment in enumerate(self.manifest["segments"]):
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
            if not (self.path / relative).is_file():
                raise CorruptCacheError(f"{self.path}: file {relative} listed in the manifest is missing")
        for relative, spec in self._chunk_sizes():
            size = (self.path / relative).stat().st_size
            if size != spec:
                raise CorruptCacheError(f"{self.path}: {relative} has {size} bytes, expected {spec} (truncated?)")

    def _chunk_sizes(self):
        if self.manifest["backend"] != "zarr":
            return
        for relative in self.manifest["checksums"]:
            parts = relative.split("/")
            if len(parts) > 3 and parts[0] == SEGMENTS and parts[3] == "c":
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


def verify(path) -> list[str]:
    """Every problem with a cache directory (empty list = good): schema, status, missing or altered files."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return [f"{path}: no {MANIFEST}"]
    try:
        manifest = read_json(manifest_path)
        check_schema(manifest, manifest_path)
    except CacheError as error:
        return [str(error)]
    problems = []
    if manifest["status"] != "complete":
        problems.append(f"{path}: status is {manifest['status']!r}, not 'complete'")
    expected_fp = fingerprint(manifest["fields"])
    if expected_fp != path.name or manifest.get("fingerprint") != path.name:
        problems.append(f"{path}: directory name {path.name} does not match the manifest fingerprint {expected_fp}")
    for relative, checksum in sorted(manifest.get("checksums", {}).items()):
        file = path / relative
        if not file.is_file():
            problems.append(f"{path}: missing file {relative}")
        elif sha256_file(file) != checksum:
            problems.append(f"{path}: checksum mismatch in {relative}")
    return problems


def list_caches(cache_root, dataset: str | None = None, agent: str | None = None) -> list[tuple[Path, dict]]:
    """(directory, manifest) of every cache under the root, optionally for one dataset/agent."""
    root = Path(cache_root)
    pattern = f"{dataset or '*'}/{agent or '*'}/*/{MANIFEST}"
    found = []
    for manifest_path in sorted(root.glob(pattern)):
        try:
            found.append((manifest_path.parent, read_json(manifest_path)))
        except CacheError:
            found.append((manifest_path.parent, {"status": "unreadable"}))
    return found


def select_cache(cache_root, dataset: str, agent: str, required: dict, hint: str = "") -> Path:
    """The one complete cache of this agent whose fields agree with `required` (a subset of the fields tree).

    Errors name what is wrong: no cache, only partial ones, the differing fields of the closest cache, or
    several matches (pin one with its fingerprint).
    """
    candidates = list_caches(cache_root, dataset, agent)
    suffix = f"\n  fill it with: {hint}" if hint else ""
    if not candidates:
        raise CacheError(f"no cache for agent {agent!r} on dataset {dataset!r} under {cache_root}{suffix}")
    matching, closest = [], None
    for path, manifest in candidates:
        if manifest.get("schema_version") != SCHEMA_VERSION:
            diff = ["schema_version"]
        else:
            diff = differing_fields(required, _subset(manifest["fields"], required))
        if not diff:
            matching.append((path, manifest))
        elif closest is None or len(diff) < len(closest[1]):
            closest = (path, diff)
    complete = [path for path, manifest in matching if manifest.get("status") == "complete"]
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        raise CacheError(f"several complete caches of agent {agent!r} match: "
                         f"{', '.join(p.name for p in complete)}; pin one with --cache-fingerprint {agent}=<fp>")
    if matching:
        raise PartialCacheError(f"the cache of agent {agent!r} ({matching[0][0]}) is partial{suffix}")
    raise FingerprintMismatch(f"no cache of agent {agent!r} matches this run; the closest ({closest[0]}) differs in "
                              f"{', '.join(closest[1])}{suffix}", closest[1])


def _subset(tree, shape):
    """The part of `tree` that has the keys of `shape` (recursively); absent keys stay absent."""
    if not isinstance(shape, dict) or not isinstance(tree, dict):
        return tree
    return {key: _subset(tree[key], value) for key, value in shape.items() if key in tree}

"""Reading a complete cache in stage 2: the row table, the arrays, and their metadata checked on open."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cache_schema.backends import RowSource, segment_path, zarr_metadata_problem
from cache_schema.errors import ChecksumMismatch, CorruptCacheError, MissingRowsError, NoCacheError, PartialCacheError
from cache_schema.layout import FILES, MANIFEST, ROWS, SEGMENTS, Row, as_rows, parse_json, parse_rows
from cache_schema.manifest import Manifest, SegmentEntry


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
            raise NoCacheError(f"{self.path}: no {MANIFEST}; not a cache directory")
        self.manifest = Manifest.read(manifest_path)
        if not self.manifest.is_complete:
            raise PartialCacheError(f"{self.path} is partial (an extraction was interrupted or is running); "
                                    "extracting again with the same options finishes it")
        self.agent = self.manifest.agent
        self.arrays = dict(self.manifest.arrays)
        self.rows = read_row_table(self.path, self.manifest)
        self._check_files()
        self._sources, self._location = [], {}
        for segment in self.manifest.segments:
            check_array_metadata(self.path, self.manifest, segment)
            source = RowSource(segment_path(self.path / SEGMENTS, segment.name, self.manifest.backend),
                               self.arrays, self.manifest.backend, segment.rows)
            self._sources.append(source)
        offset = 0
        for number, segment in enumerate(self.manifest.segments):
            for local in range(segment.rows):
                self._location[self.rows[offset + local]] = (number, local)
            offset += segment.rows
        self.index = {row: i for i, row in enumerate(self.rows)}
        self._in_ram = {name: self._read_all(name) for name in self.arrays if name not in memmap_arrays}

    def _check_files(self) -> None:
        """Cheap completeness check (existence and size); `verify` hashes everything."""
        for relative in self.manifest.checksums:
            file = self.path / relative
            if file.is_symlink() or not file.is_file():
                raise ChecksumMismatch(f"{self.path}: file {relative} listed in the manifest is missing (or not a "
                                       "plain file)")
        for relative, spec in self._chunk_sizes():
            size = (self.path / relative).stat().st_size
            if size != spec:
                raise CorruptCacheError(f"{self.path}: {relative} has {size} bytes, expected {spec} (truncated?)")

    def _chunk_sizes(self):
        if self.manifest.backend != "zarr":
            return
        for relative in self.manifest.checksums:
            parts = relative.split("/")
            if len(parts) > 3 and parts[0] == SEGMENTS and parts[3] == "c" and parts[2] in self.arrays:
                yield relative, self.arrays[parts[2]].row_bytes

    def _read_all(self, name: str) -> np.ndarray:
        return np.concatenate([source.read_all(name) for source in self._sources]) if self._sources else \
            np.empty((0, *self.arrays[name].row_shape), dtype=self.arrays[name].numpy_dtype)

    def has(self, row: Row) -> bool:
        return (str(row[0]), int(row[1])) in self._location

    def missing(self, rows) -> list[Row]:
        return [row for row in as_rows(rows) if row not in self._location]

    def read(self, name: str, rows) -> np.ndarray:
        """Rows of array `name` for the given (key, view id) pairs, in that order."""
        rows = as_rows(rows)
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


def read_row_table(path: Path, manifest: Manifest) -> list[Row]:
    """rows.json, checked against its checksum and against the manifest's row counts."""
    where = path / ROWS
    digest = manifest.checksums.get(ROWS)
    if digest is None:
        raise CorruptCacheError(f"{path}: {ROWS} is not listed in the manifest's checksums; the cache is damaged")
    try:
        data = where.read_bytes()
    except FileNotFoundError:
        raise CorruptCacheError(f"{path}: {ROWS} is missing; the cache is damaged") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChecksumMismatch(f"{where} does not match its checksum in {MANIFEST} (edited or damaged: its rows "
                               "could be attached to the wrong images); verify the cache, then pull or re-extract "
                               "it")
    rows = parse_rows(parse_json(data, where), where)
    counted = sum(segment.rows for segment in manifest.segments)
    if not counted == manifest.rows == len(rows):
        raise CorruptCacheError(f"{path}: {MANIFEST} counts {counted} row(s) in its segments and {manifest.rows} "
                                f"in 'rows', {ROWS} holds {len(rows)}; the cache is damaged")
    if len(set(rows)) != len(rows):
        raise CorruptCacheError(f"{where}: a (key, view id) row appears twice; the cache is damaged")
    return rows


def check_array_metadata(path: Path, manifest: Manifest, segment: SegmentEntry) -> None:
    """A zarr segment's own array metadata (zarr.json, checksummed) agrees with the manifest; the hdf5 datasets'
    dtype and shape are checked where the segment is opened (`RowSource`)."""
    if manifest.backend != "zarr":
        return
    for name, spec in manifest.arrays.items():
        relative = f"{SEGMENTS}/{segment.name}.zarr/{name}/zarr.json"
        try:
            data = (path / relative).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptCacheError(f"{path}: {relative} is missing; the cache is damaged") from None
        digest = manifest.checksums.get(relative)
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise ChecksumMismatch(f"{path}: {relative} does not match its checksum in {MANIFEST} (edited or "
                                   "damaged)")
        problem = zarr_metadata_problem(parse_json(data, path / relative), spec, segment.rows)
        if problem:
            raise CorruptCacheError(f"{path / relative}: {problem}; the manifest or the segment was edited")

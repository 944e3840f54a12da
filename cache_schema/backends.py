"""Two on-disk formats for one segment of rows, both readable by their own libraries and by a plain memmap.

A segment is a fixed list of rows with one array per name, shaped [rows, *row_shape]. The library (zarr or h5py)
creates the structure once; rows are then written as raw bytes by us, so that

* every write is atomic per row (zarr: one chunk file per row, written to a temporary name and renamed;
  hdf5: a contiguous dataset at a known offset, overwritten in place and recorded in a journal afterwards), and
* stage 2 reads rows without decoding and without a second copy of the cache: zarr chunk files are read straight
  into the batch buffer, hdf5 datasets through np.memmap (DESIGN.md §5 measured per-batch zarr/h5py indexing at
  100-200x the cost of a memmap read).

Zarr v3 is the default: uncompressed, one chunk per row, chunk key `c/<row>/0/...`. HDF5 keeps one file per
segment with contiguous datasets, allocated early (sparse on disk) so their offsets exist before any row does.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.errors import CorruptCacheError

# zarr and h5py are imported only where a segment of theirs is created or opened by its library: a process that
# reads zarr rows (every stage-2 data worker) never needs zarr, whose import alone takes ~0.2 s.
BACKENDS = ("zarr", "hdf5")


def segment_path(directory: Path, name: str, backend: str) -> Path:
    return directory / (f"{name}.zarr" if backend == "zarr" else f"{name}.h5")


def create_segment(path: Path, rows: int, arrays: dict[str, ArraySpec], backend: str) -> None:
    if backend == "zarr":
        import zarr

        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        for array_name, spec in arrays.items():
            group.create_array(array_name, shape=(rows, *spec.row_shape), chunks=(1, *spec.row_shape),
                               dtype=spec.numpy_dtype, compressors=None, filters=None, fill_value=0)
    elif backend == "hdf5":
        import h5py

        with h5py.File(path, "w", track_order=True) as handle:
            for array_name, spec in arrays.items():
                dataset = handle.create_dataset(array_name, shape=(rows, *spec.row_shape), dtype=spec.numpy_dtype,
                                                track_times=False)
                if rows:  # allocate the contiguous block now so its offset is known; the file stays sparse
                    dataset[(-1,) * dataset.ndim] = 0
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def zarr_chunk_path(path: Path, array_name: str, row: int, spec: ArraySpec) -> Path:
    return path / array_name / "c" / str(row) / Path(*(["0"] * len(spec.row_shape)))


def zarr_metadata_problem(metadata, spec: ArraySpec, rows: int) -> str | None:
    """How a zarr array's own metadata (zarr.json) disagrees with the manifest's spec (None: it agrees). The chunk
    files are read as raw rows, so anything but uncompressed little-endian chunks of one row is a mismatch too."""
    def get(*keys):
        value = metadata
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    shape, dtype = get("shape"), get("data_type")
    if shape != [rows, *spec.row_shape] or dtype != spec.dtype:
        return (f"the array is {dtype} of shape {shape}, the manifest says {spec.dtype} of shape "
                f"{[rows, *spec.row_shape]}")
    codecs = get("codecs")
    layout_ok = (get("chunk_grid", "configuration", "chunk_shape") == [1, *spec.row_shape] and
                 get("chunk_key_encoding", "name") == "default" and
                 get("chunk_key_encoding", "configuration", "separator") in (None, "/") and
                 isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict) and
                 codecs[0].get("name") == "bytes" and
                 (codecs[0].get("configuration") or {}).get("endian", "little") == "little")
    if not layout_ok:
        return "its chunks are not uncompressed little-endian rows, one per chunk"
    return None


def hdf5_offsets(path: Path, arrays: dict[str, ArraySpec], rows: int | None = None) -> dict[str, int]:
    """Byte offset of each contiguous dataset, after checking the segment is a readable HDF5 file whose datasets
    have the manifest's dtype and row shape (and `rows` rows) and lie inside the file."""
    import h5py

    offsets = {}
    try:
        with h5py.File(path, "r") as handle:
            for name, spec in arrays.items():
                if not isinstance(handle.get(name), h5py.Dataset):
                    raise CorruptCacheError(f"{path}: no dataset {name!r}; the segment is damaged")
                dataset = handle[name]
                expected = (dataset.shape[0] if rows is None and dataset.shape else rows, *spec.row_shape)
                if dataset.dtype != spec.numpy_dtype or dataset.shape != expected:
                    raise CorruptCacheError(f"{path}: dataset {name!r} is {dataset.dtype} of shape {dataset.shape}, "
                                            f"the manifest says {spec.dtype} of shape {expected}; the manifest or "
                                            "the segment was edited")
                offsets[name] = (dataset.id.get_offset(), dataset.shape[0] * spec.row_bytes)
    except OSError as error:  # h5py: "file signature not found", "truncated file", ...
        raise CorruptCacheError(f"{path}: not a readable HDF5 segment ({error}); the cache is damaged: pull it "
                                "again or re-extract") from None
    missing = [name for name, (offset, _) in offsets.items() if offset is None]
    if missing:
        raise CorruptCacheError(f"{path}: datasets {missing} have no contiguous storage; the segment is damaged")
    size = path.stat().st_size
    short = [name for name, (offset, length) in offsets.items() if offset + length > size]
    if short:
        raise CorruptCacheError(f"{path}: datasets {short} end beyond the file's {size} bytes (truncated?); "
                                "the segment is damaged")
    return {name: offset for name, (offset, _) in offsets.items()}


class RowWriter:
    """Writes whole rows of one segment as raw bytes. One writer per segment at a time."""

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], backend: str):
        self.path, self.arrays, self.backend = path, arrays, backend
        self._fd = None
        if backend == "hdf5":
            self._offsets = hdf5_offsets(path, arrays)
            self._fd = os.open(path, os.O_RDWR)

    def write_row(self, row: int, values: dict[str, np.ndarray]) -> dict[str, str]:
        """Write one row of every array; returns the sha256 of each array's bytes, hashed from the very buffer
        that was written (no copy of the row, no read back)."""
        digests = {}
        for name, spec in self.arrays.items():
            data = np.ascontiguousarray(values[name], dtype=spec.numpy_dtype)
            if data.shape != spec.row_shape:
                raise ValueError(f"array {name!r}: row shape {data.shape} != expected {spec.row_shape}")
            raw = data.reshape(-1).view(np.uint8)   # the row's bytes, without a copy
            if self.backend == "zarr":
                target = zarr_chunk_path(self.path, name, row, spec)
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(target.name + ".tmp")
                with open(temporary, "wb") as handle:
                    handle.write(raw)
                os.replace(temporary, target)
            else:
                os.pwrite(self._fd, raw, self._offsets[name] + row * spec.row_bytes)
            digests[name] = hashlib.sha256(raw).hexdigest()
        return digests

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RowSource:
    """Reads rows of one segment without decoding: each zarr chunk file read straight into the caller's buffer (one
    `readinto` per row, as fast as a memmap of one file and without a mapping per row), or a memmap of the hdf5
    datasets."""

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], backend: str, rows: int):
        self.path, self.arrays, self.backend, self.rows = path, arrays, backend, rows
        self._maps = {}
        if backend == "hdf5" and rows:
            offsets = hdf5_offsets(path, arrays, rows)
            for name, spec in arrays.items():
                self._maps[name] = np.memmap(path, dtype=spec.numpy_dtype, mode="r", offset=offsets[name],
                                             shape=(rows, *spec.row_shape))

    def read(self, name: str, rows: np.ndarray, out: np.ndarray) -> None:
        """Fill out[i] with row rows[i] of array `name`."""
        spec = self.arrays[name]
        if self.backend == "hdf5":
            for i, row in enumerate(rows):  # row by row: one copy, no fancy-index temporary
                out[i] = self._maps[name][int(row)]
            return
        for i, row in enumerate(rows):  # a chunk file is the raw row: read it straight into the batch buffer
            target = out[i] if out[i].flags.c_contiguous else np.empty(spec.row_shape, spec.numpy_dtype)
            with open(zarr_chunk_path(self.path, name, int(row), spec), "rb", buffering=0) as handle:
                if handle.readinto(memoryview(target).cast("B")) != spec.row_bytes:
                    raise CorruptCacheError(f"{handle.name}: shorter than one row ({spec.row_bytes} bytes); the cache "
                                            "is damaged")
            if target is not out[i]:
                out[i] = target

    def row_bytes(self, name: str, row: int) -> bytes:
        out = np.empty((1, *self.arrays[name].row_shape), dtype=self.arrays[name].numpy_dtype)
        self.read(name, np.array([row]), out)
        return out.tobytes()

    def read_all(self, name: str) -> np.ndarray:
        spec = self.arrays[name]
        out = np.empty((self.rows, *spec.row_shape), dtype=spec.numpy_dtype)
        self.read(name, np.arange(self.rows), out)
        return out

    def files(self) -> list[Path]:
        """Every file that belongs to this segment's data (for checksums)."""
        if self.backend == "hdf5":
            return [self.path]
        paths = []
        for name, spec in self.arrays.items():
            paths.append(self.path / name / "zarr.json")
            paths.extend(zarr_chunk_path(self.path, name, row, spec) for row in range(self.rows))
        return paths

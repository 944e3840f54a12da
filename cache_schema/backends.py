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

import os
from pathlib import Path

import numpy as np

from cache_schema.arrays import ArraySpec

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


def hdf5_offsets(path: Path, arrays: dict[str, ArraySpec]) -> dict[str, int]:
    import h5py

    with h5py.File(path, "r") as handle:
        offsets = {name: handle[name].id.get_offset() for name in arrays}
    missing = [name for name, offset in offsets.items() if offset is None]
    if missing:
        raise OSError(f"{path}: datasets {missing} have no contiguous storage; the segment is damaged")
    return offsets


class RowWriter:
    """Writes whole rows of one segment as raw bytes. One writer per segment at a time."""

    def __init__(self, path: Path, arrays: dict[str, ArraySpec], backend: str):
        self.path, self.arrays, self.backend = path, arrays, backend
        self._fd = None
        if backend == "hdf5":
            self._offsets = hdf5_offsets(path, arrays)
            self._fd = os.open(path, os.O_RDWR)

    def write_row(self, row: int, values: dict[str, np.ndarray]) -> dict[str, bytes]:
        """Write one row of every array; returns the bytes written per array (for checksums)."""
        written = {}
        for name, spec in self.arrays.items():
            data = np.ascontiguousarray(values[name], dtype=spec.numpy_dtype)
            if data.shape != spec.row_shape:
                raise ValueError(f"array {name!r}: row shape {data.shape} != expected {spec.row_shape}")
            raw = data.tobytes()
            if self.backend == "zarr":
                target = zarr_chunk_path(self.path, name, row, spec)
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(target.name + ".tmp")
                with open(temporary, "wb") as handle:
                    handle.write(raw)
                os.replace(temporary, target)
            else:
                os.pwrite(self._fd, raw, self._offsets[name] + row * spec.row_bytes)
            written[name] = raw
        return written

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
            offsets = hdf5_offsets(path, arrays)
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
                    raise OSError(f"{handle.name}: shorter than one row ({spec.row_bytes} bytes); the cache is damaged")
            if target is not out[i]:
                out[i] = target

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

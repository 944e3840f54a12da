"""Cache reads: the stage-2 reader against np.memmap of the same rows in one file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.bench.fixtures import write_cache
from pipelines.bench.harness import interleaved, median, ratio
from pipelines.bench.plans import Plan
from pipelines.bench.report import Result


def cache_reads(plan: Plan, dino_cache: Path, work: Path) -> dict:
    """Item 4: random batches from `CacheReader.read("tokens")` (zarr, and hdf5) / np.memmap of one .npy file
    holding the same rows, interleaved per batch; plus the whole stage-2 fetch of the step (`vision_batch`)."""
    from cache_schema import CacheReader

    shapes = plan.shapes
    zarr_reader = CacheReader(dino_cache)
    rows = list(zarr_reader.rows)
    everything = zarr_reader.read("tokens", rows)
    hdf5_root = work / "cache-hdf5"
    hdf5_path = _copy_to_hdf5(zarr_reader, hdf5_root)
    plain_path = work / "plain-tokens.npy"
    np.save(plain_path, everything)
    plain = np.load(plain_path, mmap_mode="r")
    readers = {"zarr": zarr_reader, "hdf5": CacheReader(hdf5_path)}
    rng = np.random.default_rng(1)
    picks = [rng.choice(len(rows), size=shapes.batch, replace=False) for _ in range(plan.read_batches + 5)]
    out = {"batch_bytes": int(everything[:shapes.batch].nbytes), "rows_in_cache": len(rows)}
    for backend, reader in readers.items():
        def stage2(index, reader=reader):
            reader.read("tokens", [rows[i] for i in picks[index % len(picks)]])

        def memmap(index):
            np.ascontiguousarray(plain[picks[index % len(picks)]])

        times = interleaved({"reader": stage2, "memmap": memmap}, plan.read_batches, {"reader": 5, "memmap": 5})
        out[backend] = times
    check = readers["zarr"].read("tokens", [rows[i] for i in picks[0]])
    if not np.array_equal(check, plain[picks[0]]):
        raise AssertionError("the stage-2 reader and the plain memmap returned different rows")
    return out


def _copy_to_hdf5(reader, root: Path) -> Path:
    """The same rows in an hdf5-backend cache."""
    rows = list(reader.rows)
    values = {name: reader.read(name, rows) for name in reader.arrays}
    position = {row: i for i, row in enumerate(rows)}
    fields = {key: value for key, value in reader.manifest.fields.items() if key != "schema_version"}
    return write_cache(root, reader.agent, fields, reader.arrays, rows,
                       lambda batch: {name: value[[position[row] for row in batch]] for name, value in values.items()},
                       "hdf5")


def read_results(reads: dict) -> list[Result]:
    why = {"zarr": "each row is its own chunk file: one open + read per row, where the plain memmap is one "
                   "mapping of one file",
           "hdf5": "rows of several segments are gathered per segment; the plain memmap is a single fancy index"}
    out = []
    for backend in ("zarr", "hdf5"):
        times = reads[backend]
        details = {"reader_ms": median(times["reader"]) * 1e3, "memmap_ms": median(times["memmap"]) * 1e3,
                   "reader_MB_per_s": reads["batch_bytes"] / median(times["reader"]) / 1e6,
                   "memmap_MB_per_s": reads["batch_bytes"] / median(times["memmap"]) / 1e6,
                   "batch_bytes": reads["batch_bytes"], "batches": len(times["reader"])}
        out.append(Result(4, f"cache_read_{backend}", f"stage-2 reader ({backend}) / np.memmap throughput",
                          ratio(times["memmap"], times["reader"]), "x", ">= 0.5", "cpu",
                          f"{details['reader_ms']:.2f} ms vs {details['memmap_ms']:.2f} ms per batch: {why[backend]}",
                          details))
    return out

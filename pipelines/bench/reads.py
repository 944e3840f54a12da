"""Cache reads: the stage-2 reader against np.memmap of the same rows in one .npy file.

The cache holds as many rows as a real one has row files (a EuroSAT 16-shot cache: 1,280+), so that a batch's
rows are not the handful that stay in the CPU's and the kernel's caches. The zarr cache, its hdf5 twin and the
plain file hold the same rows; each round reads the same random batches from a cache and from the plain file, in
alternating order, and a figure is the median over rounds of memmap time / reader time (throughput ratio).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cache_schema import CacheReader
from extract.families import vision
from pipelines.bench.fixtures import (
    PooledVisionRows,
    bench_context,
    bench_fields,
    cache_keys,
    vision_arrays,
    write_cache,
)
from pipelines.bench.harness import Context, interleaved, median, ratio_spread
from pipelines.bench.plans import Plan, Shapes
from pipelines.bench.report import Result

BACKENDS = ("zarr", "hdf5")


def write_plain(path: Path, shapes: Shapes, rows: int, make: PooledVisionRows) -> Path:
    """The tokens of `rows` rows as one .npy file, the np.memmap baseline."""
    plain = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                      shape=(rows, shapes.layers, shapes.tokens, shapes.width))
    keys = cache_keys(rows)
    for start in range(0, rows, 16):
        plain[start:start + 16] = make([(key, 0) for key in keys[start:start + 16]])["tokens"]
    plain.flush()
    return path


def cache_reads(plan: Plan, work: Path, seed: int = 3) -> dict:
    """Item 4, per backend: a dino-shaped cache of `plan.read_rows` rows beside the plain file of the same rows;
    `plan.reps` rounds, each reading `plan.read_batches` random batches through `CacheReader.read("tokens")` and
    through np.memmap (the same batches for both). One cache is on disk at a time. Both sides start alike: every
    file read once (its pages in the kernel's cache, as after a first epoch when the cache fits in memory) and
    opened afresh (no pages mapped by an earlier comparison)."""
    shapes = plan.shapes
    ctx = bench_context(shapes, plan.read_rows)
    make = PooledVisionRows(shapes, ctx, np.random.default_rng(seed))
    work.mkdir(parents=True, exist_ok=True)
    plain_path = write_plain(work / "plain-tokens.npy", shapes, plan.read_rows, make)
    rows = [(key, 0) for key in ctx.keys]
    fields = bench_fields("dino", vision.fingerprint_fields(ctx))
    rng = np.random.default_rng(1)
    out = {"batches_per_round": plan.read_batches, "rows_in_cache": plan.read_rows,
           "batch_bytes": shapes.batch * vision_arrays(shapes)["tokens"].row_bytes}
    for backend in BACKENDS:
        path = write_cache(work / f"cache-{backend}", "dino", fields, vision_arrays(shapes), rows, make, backend)
        read_through([plain_path, path])
        reader, plain = CacheReader(path), np.load(plain_path, mmap_mode="r")
        picks = [[rng.choice(plan.read_rows, size=shapes.batch, replace=False) for _ in range(plan.read_batches)]
                 for _ in range(plan.warmup + plan.reps)]
        runs = {"reader": _reader_rounds(reader, rows, picks), "memmap": _memmap_rounds(plain, picks)}
        out[backend] = interleaved(runs, plan.reps, {"reader": plan.warmup, "memmap": plan.warmup})
        check = picks[0][0]
        if not np.array_equal(reader.read("tokens", [rows[i] for i in check]), plain[check]):
            raise AssertionError(f"the stage-2 reader ({backend}) and the plain memmap returned different rows")
        del reader, plain
        shutil.rmtree(path, ignore_errors=True)
    return out


def read_through(paths: list[Path]) -> None:
    """Read every file under `paths` once, so their pages sit in the kernel's cache."""
    buffer = bytearray(8 << 20)
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def _reader_rounds(reader: CacheReader, rows: list, picks: list) -> Callable[[int], None]:
    """Round k (its k-th call) reads the batches of picks[k]."""
    calls = iter(picks)

    def run(_index):
        for batch in next(calls):
            reader.read("tokens", [rows[i] for i in batch])
    return run


def _memmap_rounds(plain: np.ndarray, picks: list) -> Callable[[int], None]:
    calls = iter(picks)

    def run(_index):
        for batch in next(calls):
            np.ascontiguousarray(plain[batch])
    return run


def read_results(reads: dict) -> list[Result]:
    why = {"zarr": "each row is its own chunk file: one open + read per row, where the plain memmap is one "
                   "mapping of one file",
           "hdf5": "rows of several segments are gathered per segment; the plain memmap is a single fancy index"}
    batches = reads["batches_per_round"]
    out = []
    for backend in BACKENDS:
        times = reads[backend]
        spread = ratio_spread(times["memmap"], times["reader"])
        reader_ms, memmap_ms = (median(times[name]) / batches * 1e3 for name in ("reader", "memmap"))
        details = {"reader_ms_per_batch": reader_ms, "memmap_ms_per_batch": memmap_ms,
                   "reader_MB_per_s": reads["batch_bytes"] / reader_ms / 1e3,
                   "memmap_MB_per_s": reads["batch_bytes"] / memmap_ms / 1e3,
                   "batch_bytes": reads["batch_bytes"], "rows_in_cache": reads["rows_in_cache"],
                   "batches_per_round": batches, "rounds": spread.count}
        out.append(Result(4, f"cache_read_{backend}",
                          f"stage-2 reader ({backend}) / np.memmap throughput, {reads['rows_in_cache']} rows",
                          spread.median, "x", ">= 0.5", "cpu",
                          f"{reader_ms:.2f} ms vs {memmap_ms:.2f} ms per batch: {why[backend]}", details, spread))
    return out


def measure(context: Context) -> tuple[dict, list[Result]]:
    raw = cache_reads(context.plan, context.scratch / "reads")
    return raw, read_results(raw)

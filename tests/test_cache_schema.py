"""The on-disk contract: round trips, lookups by key, resume after SIGKILL, corruption, fingerprints."""
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cache_schema import (AgentCache, ArraySpec, CacheError, CacheReader, CorruptCacheError, FingerprintMismatch,
                          MissingRowsError, PartialCacheError, SchemaVersionError, dequantize_int8, quantize_int8,
                          select_cache, verify)
from cache_schema.fingerprint import differing_fields, fingerprint

ARRAYS = {"tokens": ArraySpec((3, 4, 8), "float16"), "token_mean": ArraySpec((3, 8), "float32"),
          "views": ArraySpec((5,), "int32")}
FIELDS = {"agent": {"name": "toy"}, "dataset": {"name": "toyset", "split_hash": "abc"}}


def make_rows(n_keys=6, views=2):
    return [(f"class_{k % 3}/img_{k}.png", v) for k in range(n_keys) for v in range(views)]


def row_values(row):
    """Deterministic content derived from the row itself, so any misplacement is visible."""
    seed = int.from_bytes(row[0].encode(), "little") % 2**31 + row[1]
    rng = np.random.default_rng(seed)
    return {"tokens": rng.standard_normal((3, 4, 8)).astype(np.float16),
            "token_mean": rng.standard_normal((3, 8)).astype(np.float32),
            "views": np.array([row[1], 1, 2, 3, 4], dtype=np.int32)}


def write_all(root, rows, backend, world_size=1):
    cache = AgentCache.open(root, "toyset", "toy", FIELDS, ARRAYS, backend=backend)
    plan = cache.plan(rows, world_size)
    cache.create_segments()
    for rank in range(world_size):
        for name, local_rows in plan[rank]:
            with cache.segment_writer(name) as writer:
                for local in local_rows:
                    row = writer.rows[local]
                    values = row_values(row)
                    writer.write([local], {k: v[None] for k, v in values.items()})
    cache.finalize()
    return cache.path


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_round_trip_and_shuffled_lookup(tmp_path, backend):
    rows = make_rows()
    path = write_all(tmp_path, rows, backend)
    reader = CacheReader(path)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    tokens = reader.read("tokens", shuffled)
    means = reader.read("token_mean", shuffled)
    for i, row in enumerate(shuffled):
        expected = row_values(row)
        np.testing.assert_array_equal(tokens[i], expected["tokens"])
        np.testing.assert_array_equal(means[i], expected["token_mean"])
    assert verify(path) == []


def test_zarr_segments_are_readable_by_zarr(tmp_path):
    import zarr

    rows = make_rows(3, 1)
    path = write_all(tmp_path, rows, "zarr")
    group = zarr.open_group(str(path / "segments" / "seg-00000.zarr"), mode="r")
    table = json.loads((path / "rows.json").read_text())
    for i, (key, view) in enumerate(table):
        np.testing.assert_array_equal(group["tokens"][i], row_values((key, view))["tokens"])


def test_hdf5_segments_are_readable_by_h5py(tmp_path):
    import h5py

    rows = make_rows(3, 1)
    path = write_all(tmp_path, rows, "hdf5")
    with h5py.File(path / "segments" / "seg-00000.h5", "r") as handle:
        for i, row in enumerate(json.loads((path / "rows.json").read_text())):
            np.testing.assert_array_equal(handle["tokens"][i], row_values(tuple(row))["tokens"])


def test_incremental_rows_go_to_a_new_segment(tmp_path):
    first, extra = make_rows(4), make_rows(6)[8:]
    write_all(tmp_path, first, "zarr")
    path = write_all(tmp_path, first + extra, "zarr")
    reader = CacheReader(path)
    assert [s.name for s in reader.manifest.segments] == ["seg-00000", "seg-00001"]
    assert reader.rows == sorted(first) + sorted(extra)
    np.testing.assert_array_equal(reader.read("tokens", [extra[0]])[0], row_values(extra[0])["tokens"])


def test_missing_rows_name_the_agent_and_keys(tmp_path):
    reader = CacheReader(write_all(tmp_path, make_rows(2), "zarr"))
    with pytest.raises(MissingRowsError, match="toy") as info:
        reader.read("tokens", [("nope.png", 0)])
    assert info.value.missing == [("nope.png", 0)]


def test_partial_cache_is_refused(tmp_path):
    cache = AgentCache.open(tmp_path, "toyset", "toy", FIELDS, ARRAYS)
    cache.plan(make_rows(2))
    cache.create_segments()
    with pytest.raises(PartialCacheError):
        CacheReader(cache.path)
    with pytest.raises(PartialCacheError):
        cache.finalize()


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_corruption_is_detected(tmp_path, backend):
    path = write_all(tmp_path, make_rows(2), backend)
    victim = next(p for p in sorted((path / "segments").rglob("*")) if p.is_file() and
                  (p.suffix == ".h5" or p.parent.name == "0") and p.stat().st_size > 16)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify(path)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    assert victim.relative_to(path).as_posix() in problems[0]


def test_truncated_chunk_is_refused_on_open(tmp_path):
    path = write_all(tmp_path, make_rows(2), "zarr")
    chunk = path / "segments" / "seg-00000.zarr" / "tokens" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CorruptCacheError, match="truncated"):
        CacheReader(path)


def test_schema_version_mismatch(tmp_path):
    path = write_all(tmp_path, make_rows(1), "zarr")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="999"):
        CacheReader(path)


def test_select_cache_names_the_differing_field(tmp_path):
    write_all(tmp_path, make_rows(1), "zarr")
    assert select_cache(tmp_path, "toyset", "toy", {"dataset": {"split_hash": "abc"}}).is_dir()
    with pytest.raises(FingerprintMismatch, match="dataset.split_hash") as info:
        select_cache(tmp_path, "toyset", "toy", {"dataset": {"split_hash": "zzz"}}, hint="transagent extract ...")
    assert "transagent extract" in str(info.value)
    with pytest.raises(CacheError, match="no cache"):
        select_cache(tmp_path, "toyset", "other", {})


def test_reopen_with_other_arrays_is_an_error(tmp_path):
    AgentCache.open(tmp_path, "toyset", "toy", FIELDS, ARRAYS)
    with pytest.raises(FingerprintMismatch, match="arrays.tokens"):
        AgentCache.open(tmp_path, "toyset", "toy", FIELDS, {**ARRAYS, "tokens": ArraySpec((3, 4, 8), "float32")})


def test_fingerprint_changes_with_every_field():
    base = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
    assert fingerprint(base) == fingerprint({"b": {"d": "x", "c": [1, 2]}, "a": 1})
    for changed in ({"a": 2, "b": base["b"]}, {"a": 1, "b": {"c": [2, 1], "d": "x"}}, {"a": 1, "b": {"c": [1, 2]}}):
        assert fingerprint(changed) != fingerprint(base)
    assert differing_fields(base, {"a": 1, "b": {"c": [1, 2], "d": "y"}}) == ["b.d"]


def test_int8_round_trip():
    values = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    quantized, scale = quantize_int8(values)
    restored = dequantize_int8(quantized, scale)
    assert quantized.dtype == np.int8 and scale.shape == (2, 5)
    assert np.abs(restored - values).max() <= np.abs(values).max(axis=-1, keepdims=True).max() / 127
    quantized, scale = quantize_int8(np.zeros((3, 16), np.float32))
    assert not quantized.any() and (scale == 1).all()       # an all-zero token: scale 1, as stage 1 writes it
    assert not dequantize_int8(quantized, scale).any()


def test_two_writers_equal_one(tmp_path):
    rows = make_rows()
    one = CacheReader(write_all(tmp_path / "one", rows, "zarr", world_size=1))
    two = CacheReader(write_all(tmp_path / "two", rows, "zarr", world_size=2))
    assert one.rows == two.rows
    np.testing.assert_array_equal(one.read("tokens", rows), two.read("tokens", rows))


KILLABLE_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_cache_schema import ARRAYS, FIELDS, make_rows, row_values
    from cache_schema import AgentCache
    cache = AgentCache.open({root!r}, "toyset", "toy", FIELDS, ARRAYS, backend={backend!r})
    plan = cache.plan(make_rows(8, 2))
    cache.create_segments()
    for name, local_rows in plan[0]:
        with cache.segment_writer(name) as writer:
            for local in local_rows:
                values = row_values(writer.rows[local])
                writer.write([local], {{k: v[None] for k, v in values.items()}})
                print(local, flush=True)
                time.sleep(0.05)
    cache.finalize()
""")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, backend):
    script = KILLABLE_WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path / "killed"), backend=backend)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_dir = next((tmp_path / "killed" / "toyset" / "toy").iterdir())
    assert json.loads((killed_dir / "manifest.json").read_text())["status"] == "partial"
    with pytest.raises(PartialCacheError):
        CacheReader(killed_dir)
    resumed = CacheReader(write_all(tmp_path / "killed", make_rows(8, 2), backend))
    clean = CacheReader(write_all(tmp_path / "clean", make_rows(8, 2), backend))
    assert resumed.rows == clean.rows
    assert (resumed.path / "rows.json").read_bytes() == (clean.path / "rows.json").read_bytes()
    for name in ARRAYS:
        np.testing.assert_array_equal(resumed.read(name, clean.rows), clean.read(name, clean.rows))
    segment = "seg-00000.zarr" if backend == "zarr" else "seg-00000.h5"
    assert _tree_bytes(resumed.path / "segments" / segment) == _tree_bytes(clean.path / "segments" / segment)


def _tree_bytes(path):
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

"""The work around an agent's forward, by thread: inputs made by loader workers, rows converted, hashed and written
by the writer's thread, never by the thread that runs the model; rows hashed from the very buffer written."""
import hashlib
import logging
import threading
import tracemalloc
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from cache_schema import AgentCache, ArraySpec
from cache_schema.backends import RowWriter
from cache_schema.lock import WriterLock, current_holder
from extract.agents import LoadRequest, get_agent
from extract.families import ExtractContext, vision
from extract.runner import AgentJob, run_agent
from extract.runner.inputs import prefetched
from extract.runner.monitoring import waiting_for_lock
from pipelines.presets import student_spec

STUDENT = student_spec("tiny")


def dino_job(root, keys=6, views=2, batch=4, dtype="float16"):
    rng = np.random.default_rng(0)
    names = []
    for index in range(keys):
        names.append(f"images/{index}.png")
        (root / names[-1]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(root / names[-1])
    ctx = ExtractContext(dataset="toyset", image_root=root, keys=names, classnames=["a", "b"],
                         template="a photo of a {}.", student=STUDENT, views=views, batch_size=batch, dtype=dtype)
    return AgentJob(get_agent("dino"), ctx, LoadRequest(tiny=True, student=STUDENT))


def test_the_models_thread_runs_only_the_model(tmp_path, monkeypatch):
    threads = defaultdict(set)

    def spy(owner, name):
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            threads[name].add(threading.get_ident())
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    for name in ("prepare", "compute", "finish"):
        spy(vision, name)
    spy(RowWriter, "write_row")
    job = dino_job(tmp_path / "data")
    report = run_agent(job, tmp_path / "cache", progress=False)
    assert report.status == "done" and report.rows == 12
    (model,) = threads["compute"]   # one thread calls the model ...
    assert threads["prepare"] and threads["finish"] and threads["write_row"]
    for stage in ("prepare", "finish", "write_row"):   # ... and does nothing else
        assert model not in threads[stage], stage


@pytest.mark.parametrize("dtype", ["float16", "int8", "float32"])
def test_split_work_gives_the_rows_compute_gives(tmp_path, dtype):
    job = dino_job(tmp_path, keys=2, dtype=dtype)
    runtime = job.spec.load(job.request)
    rows = vision.rows(job.ctx)
    whole = vision.compute(runtime, rows, job.ctx)
    split = vision.finish(vision.compute(runtime, rows, job.ctx, vision.prepare(runtime, rows, job.ctx),
                                         stored=False), job.ctx)
    assert set(split) == set(whole) == set(vision.arrays(runtime, job.ctx))
    for name in whole:
        assert split[name].dtype == whole[name].dtype and split[name].tobytes() == whole[name].tobytes(), name


@pytest.mark.parametrize("agent", ["dino", "sam"])   # ImageNet statistics on [0, 1]; SAM's on 0-255
def test_looked_up_pixels_equal_torchs_arithmetic(tmp_path, agent):
    """Every 8-bit value in every channel, and the strides the model sees, as `normalise_pixels` makes them."""
    job = dino_job(tmp_path, keys=1)
    runtime = get_agent(agent).load(LoadRequest(tiny=True, student=STUDENT))
    image = np.arange(3 * 32 * 32).reshape(32, 32, 3) % 256
    image[..., 1], image[..., 2] = image[..., 1][::-1], image[..., 2].T   # each channel holds all 256 values
    Image.fromarray(image.astype(np.uint8)).save(tmp_path / job.ctx.keys[0])
    rows = [(job.ctx.keys[0], 0)]
    pixels, _ = vision.prepare(runtime, rows, job.ctx)
    view = np.array(Image.open(tmp_path / job.ctx.keys[0]).convert("RGB"), np.uint8)[None]
    assert all(len(np.unique(view[..., c])) == 256 for c in range(3))
    expected = vision.normalise_pixels(torch.from_numpy(view).permute(0, 3, 1, 2).float() / 255.0, runtime)
    assert pixels.dtype == expected.dtype and pixels.stride() == expected.stride()
    assert torch.equal(pixels, expected)


def test_the_float16_cast_rounds_as_numpy_does():
    """Every tie between neighbouring float16 values (round half to even), the overflow edge, subnormals, float32
    denormals and a million random float32 bit patterns: torch's cast on the writer's thread = numpy's astype (all
    2**32 float32 values agree but NaNs, whose payloads torch writes otherwise: rows with a NaN are cast by numpy)."""
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(np.unique(halves[np.isfinite(halves)].astype(np.float64)))
    ties = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    edges = np.array([65504, 65519.996, 65520, 1e30, np.inf, -np.inf, 0.0, -0.0, 2**-24, 2**-25, 1e-40, -1e-45],
                     np.float32)
    bits = np.random.default_rng(0).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ctx = ExtractContext(dataset="d", image_root=None, keys=[], classnames=[], template="{}", student=STUDENT)
    numbers = np.concatenate([ties, -ties, edges, bits[~np.isnan(bits)], finite.astype(np.float32)])
    for values in (numbers, bits):   # bits holds NaNs of many payloads
        tokens = values.reshape(1, 1, 1, -1)
        with np.errstate(over="ignore", invalid="ignore"):
            expected = values.astype(np.float16)
            cast = vision.finish({"tokens": tokens, "token_mean": tokens.mean(axis=2)}, ctx)["tokens"]
        assert cast.dtype == np.float16
        np.testing.assert_array_equal(cast.reshape(-1).view(np.uint16), expected.view(np.uint16))


def test_prefetched_keeps_the_order_and_raises_an_error_in_its_turn():
    started = threading.Event()

    def prepare(item):
        if item == 1:
            started.wait(5)   # item 2 is prepared while item 1 still waits: work runs ahead, on other threads
        if item == 2:
            started.set()
        if item == 3:
            raise ValueError("item 3 is unreadable")
        return item * 10, threading.get_ident()

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for item, (value, thread) in prefetched(range(6), prepare, workers=2):
            got.append((item, value))
            assert thread != threading.get_ident()
    assert got == [(0, 0), (1, 10), (2, 20)] and started.is_set()
    assert list(prefetched("ab", None)) == [("a", None), ("b", None)]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_rows_are_hashed_from_the_buffer_written_without_a_copy(tmp_path, backend):
    spec = ArraySpec((4, 256, 256), "float16")   # 512 KiB a row
    cache = AgentCache.open(tmp_path, "toyset", "toy", {"agent": {"name": "toy"}}, {"tokens": spec}, backend)
    ((segment, local),) = cache.plan([(f"k{i}", 0) for i in range(3)])[0]
    cache.create_segments()
    tokens = np.random.default_rng(0).standard_normal((3, *spec.row_shape)).astype(np.float16)
    with cache.segment_writer(segment) as writer:
        tracemalloc.start()
        writer.write(local, {"tokens": tokens})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < spec.row_bytes / 4, f"{peak} bytes allocated to write rows of {spec.row_bytes}"
    (done,) = cache.segments()
    assert done.done == {i: {"tokens": hashlib.sha256(tokens[i].tobytes()).hexdigest()} for i in range(3)}


def test_waiting_for_a_writer_is_logged(tmp_path, caplog):
    with WriterLock(tmp_path, purpose="merge"):
        with caplog.at_level(logging.WARNING, logger="extract.runner"):
            waiting_for_lock(tmp_path, current_holder(tmp_path), 30)
    assert "waiting up to 30 s" in caplog.text and "(merge)" in caplog.text

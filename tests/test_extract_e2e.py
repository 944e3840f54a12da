"""Stage 1 end to end on the tiny zoo: all 11 agents, skip when complete, resume after SIGKILL, fingerprints, memory
between agents, and bad inputs (unknown agent, size limit, missing descriptions, unreadable images, full disk, OOM).

Runs use --batch-size 3, which does not divide the row counts: the runner batches rows on fixed boundaries of each
segment, so a resumed run computes every row in the same batch as an uninterrupted one and must reproduce it bit
for bit (batch composition changes the last bits of padded text encoders). Torch runs on one thread here and in the
subprocesses: thread counts change some reductions' rounding, and two OpenMP threads on a busy 2-core machine make
the tiny models' many small ops tens of times slower.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_schema import CacheReader, verify
from cache_schema.views import ViewSpec
from pipelines.cli import main

AGENTS = ("bert", "blip2", "dino", "gpt3", "mae", "pixart", "sam", "sd", "shikra", "vicuna", "vitdet")
SMALL = {"num_classes": 4, "per_class": (6, 2, 3)}
OPTIONS = ("--dataset", "synthetic", "--preset", "tiny", "--shots", "4", "--seeds", "1", "--views", "2",
           "--batch-size", "3")
ROWS = {"vision": 16, "t2i": 8, "i2t": 8, "language": 4}   # 2 base classes x 4 shots (x 2 views); 4 classes


def extract_args(data_root, cache_root, *extra):
    return ["extract", *OPTIONS, "--data-root", str(data_root), "--cache-root", str(cache_root), *map(str, extra)]


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def caches(cache_root) -> dict[str, Path]:
    """'<agent>/<fingerprint>' -> directory, for every cache under the root."""
    return {f"{p.parent.parent.name}/{p.parent.name}": p.parent
            for p in sorted(Path(cache_root).glob("*/*/*/manifest.json"))}


def manifest(path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def log_entries(cache_root) -> list[dict]:
    path = Path(cache_root) / "synthetic" / "extract.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_caches(expected_root, actual_root, agents=AGENTS):
    """Same cache directories (fingerprints), row tables byte for byte, every array of every row, extra files."""
    expected = {name: path for name, path in caches(expected_root).items() if name.split("/")[0] in agents}
    actual = {name: path for name, path in caches(actual_root).items() if name.split("/")[0] in agents}
    assert sorted(actual) == sorted(expected)
    for name, path in expected.items():
        assert verify(actual[name]) == [], name
        assert (actual[name] / "rows.json").read_bytes() == (path / "rows.json").read_bytes(), name
        want, got = CacheReader(path), CacheReader(actual[name])
        assert got.arrays == want.arrays
        for array in want.arrays:
            np.testing.assert_array_equal(got.read(array, want.rows), want.read(array, want.rows),
                                          err_msg=f"{name} {array}")
        files = sorted(f.relative_to(path / "files") for f in (path / "files").rglob("*") if f.is_file())
        for file in files:
            assert (actual[name] / "files" / file).read_bytes() == (path / "files" / file).read_bytes(), name


THREADS = 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted extraction of all 11 tiny agents; the other tests compare against it."""
    from pipelines.datasets import make_synthetic

    root = tmp_path_factory.mktemp("extract")
    make_synthetic(root / "data", **SMALL)
    result = invoke(*extract_args(root / "data", root / "cache"))
    assert result.exit_code == 0, result.output
    return root


def test_all_agents_write_complete_verified_caches(reference):
    found = caches(reference / "cache")
    assert sorted(name.split("/")[0] for name in found) == sorted(AGENTS)
    families = {}
    for name, path in found.items():
        data = manifest(path)
        assert data["status"] == "complete" and verify(path) == [], name
        family = data["fields"]["agent"]["family"]
        families[data["agent"]] = family
        assert data["rows"] == ROWS[family], name
    assert sorted(families.values()).count("vision") == 4
    done = [entry for entry in log_entries(reference / "cache") if entry.get("status") == "done"]
    assert sorted(entry["agent"] for entry in done) == sorted(AGENTS)
    assert all(entry["model_loaded"] and entry["peak_rss_bytes"] > 0 for entry in done)


def test_sd_runs_after_vicuna_on_the_descriptions_it_generated(reference):
    """synthetic has no official Vicuna descriptions: vicuna generates them, sd (run after it) is conditioned on them
    and its fingerprint names vicuna's cache."""
    found = caches(reference / "cache")
    vicuna = next(path for name, path in found.items() if name.startswith("vicuna/"))
    sd = manifest(next(path for name, path in found.items() if name.startswith("sd/")))["fields"]["family"]
    assert sd["conditioning"] == "vicuna" and sd["vicuna_cache"] == vicuna.name and "template" not in sd
    assert (vicuna / "files" / "descriptions.json").is_file()
    done = [entry["agent"] for entry in log_entries(reference / "cache") if entry.get("status") == "done"]
    assert done.index("vicuna") < done.index("sd")


def test_a_second_extract_loads_no_model_and_imports_no_torch(reference, monkeypatch):
    from extract.agents import registry

    def must_not_load(request):
        raise AssertionError("a complete cache must not load its agent")

    for name, spec in list(registry().items()):
        monkeypatch.setitem(registry(), name, replace(spec, load=must_not_load))
    result = invoke(*extract_args(reference / "data", reference / "cache"))
    assert result.exit_code == 0, result.output
    assert "11 job(s), 11 already complete" in result.output
    monkeypatch.undo()

    script = ("import sys, time\nstart = time.perf_counter()\nfrom pipelines.cli import main\n"
              f"main({extract_args(reference / 'data', reference / 'cache')!r}, standalone_mode=False)\n"
              "print('seconds', time.perf_counter() - start)\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=subprocess_env())
    assert output.returncode == 0, output.stderr
    assert "11 already complete" in output.stdout
    assert output.stdout.strip().endswith("NO-TORCH"), output.stdout


# ---- SIGKILL mid-way --------------------------------------------------------------------------------------------

def _journal_progress(cache_root):
    """(agents logged done, caches that are partial with some but not all rows of a segment journaled)."""
    done = {entry["agent"] for entry in _read_log_lines(Path(cache_root) / "synthetic" / "extract.jsonl")
            if entry.get("status") == "done"}
    midway = []
    for journal in Path(cache_root).glob("synthetic/*/*/segments/*.done.jsonl"):
        rows_file = journal.with_name(journal.name.replace(".done.jsonl", ".rows.json"))
        try:
            rows = len(json.loads(rows_file.read_text()))
            written = journal.read_text().count("\n")
        except (OSError, ValueError):
            continue
        if 0 < written < rows:
            midway.append(journal.parent.parent)
    return done, midway


def _read_log_lines(path):
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def kill_when(process, ready, timeout=180.0) -> bool:
    """SIGKILL `process` once `ready()` holds. The process is frozen (SIGSTOP) and `ready()` re-checked first, so
    the state on disk at the kill is the state that was checked."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(process.pid, signal.SIGSTOP)
            if ready():
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return True
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.002)
    return False


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    cache_root = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-m", "pipelines", *extract_args(reference / "data", cache_root)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())

    def one_done_one_midway():
        done, midway = _journal_progress(cache_root)
        return bool(done) and bool(midway)

    try:
        killed = kill_when(process, one_done_one_midway)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert killed, "the extraction finished before it could be killed mid-way"
    states = {name: manifest(path)["status"] for name, path in caches(cache_root).items()}
    assert "complete" in states.values() and "partial" in states.values(), states

    result = invoke(*extract_args(reference / "data", cache_root))
    assert result.exit_code == 0, result.output
    assert_same_caches(reference / "cache", cache_root)


# ---- fingerprints -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jobs(reference):
    from pipelines.extraction import ExtractOptions, build_jobs

    options = ExtractOptions(dataset="synthetic", data_root=reference / "data", cache_root=reference / "cache",
                             preset="tiny", shots=(4,), seeds=(1,), views=2, batch_size=3)
    return {job.spec.name: job for job in build_jobs(options)}


def test_fingerprint_follows_everything_that_changes_the_numbers(jobs, tmp_path):
    from extract.runner import AgentJob, planned_path

    def path(job, spec=None, request=None, weights=None, **ctx):
        return planned_path(AgentJob(spec or job.spec, replace(job.ctx, **ctx), request or job.request,
                                     weights or job.weights), tmp_path)

    dino, sd, blip2, bert, gpt3 = (jobs[name] for name in ("dino", "sd", "blip2", "bert", "gpt3"))
    assert all(path(job) == path(job) for job in jobs.values())
    assert len({path(job) for job in jobs.values()}) == len(jobs)
    for job in jobs.values():  # the split file is the identity of the keys, for every agent
        assert path(job, split_hash="0" * 64) != path(job)
    for job in (sd, blip2, bert, gpt3):  # text agents: template and class names
        assert path(job, template="a blurry photo of a {}.") != path(job) or job is sd
        assert path(job, classnames=[*job.ctx.classnames[:-1], "grey blob"]) != path(job)
    # sd is conditioned on the descriptions vicuna generates: its fingerprint chains vicuna's, not the template
    assert sd.ctx.options["vicuna_cache"] == planned_path(jobs["vicuna"], tmp_path).name
    assert path(sd, options={**sd.ctx.options, "vicuna_cache": "0" * 16}) != path(sd)
    on_template = {"conditioning": "template"}
    assert path(sd, options=on_template, template="a blurry photo of a {}.") != path(sd, options=on_template)
    assert path(dino, template="a blurry photo of a {}.") == path(dino)  # vision agents read no text
    # t2i scores softmax over the class set; i2t scores are per class and sliced freely
    assert path(sd, class_set="all") != path(sd)
    assert path(blip2, class_set="all") == path(blip2)
    # the source (hub revision) counts for real weights, and preprocessing always
    paper = replace(dino.request, tiny=False)
    pinned = replace(dino.spec, source=replace(dino.spec.source, revision="0123abc"))
    assert path(dino, spec=pinned, request=paper) != path(dino, request=paper)
    assert path(dino, spec=replace(dino.spec, preprocessing={**dino.spec.preprocessing, "mean": [0.5] * 3})) \
        != path(dino)
    assert path(dino, weights={"model.safetensors": "0" * 64}) != path(dino)
    # vision: student grid, view spec, layers, token pooling, dtype ... but not the number of views
    assert path(dino, student=replace(dino.ctx.student, patch_size=4)) != path(dino)
    assert path(dino, view_spec=ViewSpec(seed=1)) != path(dino)
    assert path(dino, view_spec=ViewSpec(scale=(0.5, 1.0))) != path(dino)
    assert path(dino, layers=(0, 2)) != path(dino)
    assert path(dino, token_pool=2) != path(dino)
    assert path(dino, dtype="int8") != path(dino) and path(dino, dtype="float32") != path(dino)
    assert path(dino, views=4) == path(dino) and path(dino, views=1) == path(dino)


def test_local_weights_are_identified_by_content(tmp_path):
    from extract.runner import local_weights

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    memo = tmp_path / "cache" / ".weights-sha256.json"
    first = local_weights(weights, memo)
    assert sorted(first) == ["config.json", "model.safetensors"] and memo.is_file()
    assert local_weights(weights, memo) == first
    moved = tmp_path / "elsewhere"
    weights.rename(moved)
    assert local_weights(moved, memo) == first          # the path is not the identity ...
    (moved / "model.safetensors").write_bytes(b"\x01" * 64)
    assert local_weights(moved, memo) != first          # ... the content is


# ---- memory: one agent alive at a time --------------------------------------------------------------------------

BIG, SMALL_BYTES = 768 * 2**20, 2 * 2**20  # BIG above the free-but-resident memory earlier tests leave


class BallastModel(torch.nn.Module):
    """A 2-block 'vision agent': a patch embedding plus `ballast_bytes` of parameters (touched, so resident)."""

    def __init__(self, ballast_bytes: int):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8, patch_size=8)
        self.patch = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.ballast = torch.nn.Parameter(torch.full((ballast_bytes // 4,), 0.5), requires_grad=False)

    @property
    def dtype(self):
        return self.patch.weight.dtype


def release_freed_memory() -> None:
    """Collect garbage and hand glibc's free pages back, so RSS starts from what is alive."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def ballast_runtime(ballast_bytes, student):
    from extract.families.vision import IMAGENET_MEAN, IMAGENET_STD, VisionRuntime

    class BallastRuntime(VisionRuntime):
        def block_outputs(self, pixels):
            tokens = self.model.patch(pixels).permute(0, 2, 3, 1) * self.model.ballast[-1]
            return torch.stack([tokens, tokens.relu()], dim=1)

    return BallastRuntime(BallastModel(ballast_bytes), student, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def register(monkeypatch, name, load):
    from extract.agents import registry
    from extract.agents.base import AgentSpec, Source

    spec = AgentSpec(name=name, family="vision", source=Source(note="built by the test"),
                     preprocessing={"test": name}, emits=("tokens", "token_mean", "views"), load=load,
                     tiny_config={"test": name})
    monkeypatch.setitem(registry(), name, spec)


def test_an_agent_is_freed_before_the_next_one_loads(reference, tmp_path, monkeypatch):
    release_freed_memory()  # what earlier tests freed must not shrink RSS while these agents run
    alive = {}

    def load_big(request):
        runtime = ballast_runtime(BIG, request.student)
        alive["big"] = weakref.ref(runtime)
        return runtime

    def load_small(request):
        alive["big when small loads"] = alive["big"]() is not None
        return ballast_runtime(SMALL_BYTES, request.student)

    register(monkeypatch, "big", load_big)
    register(monkeypatch, "small", load_small)
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--agents", "big,small"))
    assert result.exit_code == 0, result.output
    assert alive["big when small loads"] is False
    peaks = {entry["agent"]: entry["peak_rss_bytes"] for entry in log_entries(tmp_path / "cache")}
    assert peaks["small"] < peaks["big"] + SMALL_BYTES
    assert peaks["small"] < peaks["big"] - BIG // 2, peaks   # far below "both resident at once"


# ---- bad inputs -------------------------------------------------------------------------------------------------

def test_unknown_agent_lists_the_known_ones(reference, tmp_path):
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--agents", "dino,dalle"))
    assert result.exit_code != 0
    assert "dalle" in result.output and all(name in result.output for name in AGENTS)
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--agents", "dino",
                                  "--agent-path", "dalle=/tmp"))
    assert result.exit_code != 0 and "--agent-path dalle" in result.output and "vitdet" in result.output
    assert not (tmp_path / "cache").exists()


def test_size_limit_refusal_names_the_knobs(reference, tmp_path):
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--max-bytes", "1000"))
    assert result.exit_code != 0
    for knob in ("--views", "--layers", "--token-pool 2", "--dtype int8", "--max-bytes"):
        assert knob in result.output
    assert not (tmp_path / "cache").exists()


def test_the_size_estimate_counts_i2t_image_features(jobs):
    from pipelines.extraction import I2T_MAX_FEATURE_DIM, estimate_bytes

    sizes = estimate_bytes([jobs["blip2"], jobs["dino"]])
    assert sizes["blip2"] == 8 * (4 + I2T_MAX_FEATURE_DIM) * 4   # scores [N, C] + image_features [N, <= 4096]
    assert sizes["dino"] >= 16 * 3 * 16 * 64 * 2                  # tokens [R, L, T, D] float16 at least


def test_descriptions_missing_classes_are_listed(reference, tmp_path):
    descriptions = tmp_path / "gpt3.json"
    descriptions.write_text(json.dumps({"red circle": ["a red disc."], "green square": ["a green box."]}))
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--agents", "gpt3,bert",
                                  "--descriptions", f"gpt3={descriptions}"))
    assert result.exit_code != 0
    assert "agent gpt3 failed" in result.output
    assert "no descriptions for 2 of 4 classes" in result.output
    assert "'blue horizontal stripes'" in result.output and "'yellow vertical stripes'" in result.output
    # gpt3 failed before writing anything; bert, which runs first, finished
    assert [(name.split("/")[0], manifest(path)["status"]) for name, path in caches(tmp_path / "cache").items()] \
        == [("bert", "complete")]


def test_hub_errors_name_the_local_path_flag(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("extract", "--dataset", "synthetic", "--preset", "paper", "--shots", "4", "--views", "1",
                    "--data-root", reference / "data", "--cache-root", tmp_path / "cache", "--agents", "dino,vitdet",
                    "--device", "cpu")
    assert result.exit_code != 0
    assert "agent dino failed" in result.output and "--agent-path dino=DIR" in result.output
    assert "agent vitdet failed" in result.output and "--agent-path vitdet=DIR" in result.output
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--preset", "paper", "--agent-path",
                                  f"vitdet={tmp_path / 'missing'}"))
    assert result.exit_code != 0 and f"--agent-path vitdet={tmp_path / 'missing'}: no such directory" in result.output


def test_unreadable_images_stop_or_skip(reference, tmp_path):
    from pipelines.datasets import load_dataset, make_synthetic
    from pipelines.protocols import training_set

    data = tmp_path / "data"
    make_synthetic(data, **SMALL)
    keys = training_set(load_dataset("synthetic", data), "base2novel", 4, 1, data).keys
    broken, missing = keys[1], keys[5]
    image_root = data / "synthetic" / "images"
    (image_root / broken).write_bytes(b"not an image")
    (image_root / missing).unlink()
    cache_root = tmp_path / "cache"
    args = extract_args(data, cache_root, "--agents", "bert,dino")

    stopped = invoke(*args)
    assert stopped.exit_code != 0
    assert "2 image(s)" in stopped.output and broken in stopped.output and missing in stopped.output
    assert "--on-error skip" in stopped.output and "No cache was written" in stopped.output
    assert not cache_root.exists()

    skipped = invoke(*args, "--on-error", "skip")
    assert skipped.exit_code == 0, skipped.output
    events = [entry for entry in log_entries(cache_root) if entry.get("event") == "skipped_images"]
    assert len(events) == 1 and sorted(events[0]["images"]) == sorted([broken, missing])
    (dino,) = [path for name, path in caches(cache_root).items() if name.startswith("dino/")]
    assert manifest(dino)["provenance"]["skipped_keys"] == sorted([broken, missing])
    reader = CacheReader(dino)
    assert len(reader.rows) == 12 and not {broken, missing} & {key for key, _ in reader.rows}

    make_synthetic(data, **SMALL)  # puts the missing image back
    (image_root / broken).write_bytes((reference / "data" / "synthetic" / "images" / broken).read_bytes())
    fixed = invoke(*args)
    assert fixed.exit_code == 0, fixed.output
    assert manifest(dino)["provenance"]["skipped_keys"] == [] and verify(dino) == []
    want = CacheReader(caches(reference / "cache")[f"dino/{dino.name}"])
    got = CacheReader(dino)
    assert sorted(got.rows) == sorted(want.rows)
    np.testing.assert_array_equal(got.read("tokens", want.rows), want.read("tokens", want.rows))


def test_a_full_disk_leaves_a_partial_cache_that_a_rerun_completes(reference, tmp_path, monkeypatch):
    from cache_schema.writer import SegmentWriter

    original = SegmentWriter.write
    written = {"dino": 0}

    def write_until_full(self, local_rows, arrays):
        if self.cache.manifest["agent"] == "dino":
            if written["dino"] >= 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["dino"] += len(local_rows)
        return original(self, local_rows, arrays)

    monkeypatch.setattr(SegmentWriter, "write", write_until_full)
    cache_root = tmp_path / "cache"
    args = extract_args(reference / "data", cache_root, "--agents", "bert,dino,mae")
    full = invoke(*args)
    assert full.exit_code != 0
    assert "agent dino failed" in full.output and "the disk is full" in full.output
    assert "re-run the same command" in full.output
    states = {name.split("/")[0]: manifest(path)["status"] for name, path in caches(cache_root).items()}
    assert states == {"bert": "complete", "dino": "partial", "mae": "complete"}
    failed = [entry for entry in log_entries(cache_root) if entry.get("status") == "failed"]
    assert [entry["agent"] for entry in failed] == ["dino"]
    (partial,) = [path for name, path in caches(cache_root).items() if name.startswith("dino/")]
    assert (partial / "segments" / "seg-00000.done.jsonl").read_text().count("\n") == 6  # two batches of 3

    monkeypatch.undo()
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "2 already complete" in resumed.output
    done = [entry for entry in log_entries(cache_root) if entry.get("status") == "done" and entry["agent"] == "dino"]
    assert done[-1]["rows"] == 16 - 6
    assert_same_caches(reference / "cache", cache_root, agents=("bert", "dino", "mae"))


def test_out_of_memory_is_explained_per_agent(reference, tmp_path, monkeypatch):
    def load_too_big(request):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def load_then_overflow(request):
        runtime = ballast_runtime(SMALL_BYTES, request.student)

        def block_outputs(pixels):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        runtime.block_outputs = block_outputs
        return runtime

    register(monkeypatch, "oomload", load_too_big)
    register(monkeypatch, "oomrun", load_then_overflow)
    result = invoke(*extract_args(reference / "data", tmp_path / "cache", "--agents", "dino,oomload,oomrun"))
    assert result.exit_code != 0
    assert "agent oomload failed" in result.output and "does not fit in memory on cpu" in result.output
    assert "agent oomrun failed" in result.output and "smaller --batch-size" in result.output
    assert "Finished agents' caches stay complete" in result.output
    assert_same_caches(reference / "cache", tmp_path / "cache", agents=("dino",))

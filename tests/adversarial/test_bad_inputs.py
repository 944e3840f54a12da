"""Bad input gets one sentence naming the file, field or flag, never a traceback (stage 2, images, roots, flags).

* distill/evaluate on an unknown dataset, too few shots, a folder class with too few images
* a zero-byte or truncated image: named before training, not at evaluation
* a read-only cache, runs or data root (extract, pull, merge, pack, prepare, distill), simulated as EROFS/EACCES
* --device cuda without a GPU, --agents "", --max-bytes nan
* a NaN loss in the first epoch (no checkpoint exists to promise)
* distill after `extract --on-error skip`: which images were skipped and how to leave them out
* 16-bit PNGs scaled to 8 bits, and caches of the old image decoding never mixed with the new
"""
import builtins
import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.cli import main

SMALL = {"num_classes": 4, "per_class": (6, 2, 3)}
SHOTS = "4"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, exit_code: int = 1) -> str:
    """The message of a clean failure through click (exit 1; 2 for a bad flag value), no traceback."""
    assert result.exit_code == exit_code and isinstance(result.exception, SystemExit), (result.output,
                                                                                        result.exception)
    assert "Traceback" not in result.output and "Error: " in result.output
    return result.output


def distill_args(data, cache, runs, *extra):
    return ["distill", "--dataset", "synthetic", "--preset", "tiny", "--data-root", data, "--cache-root", cache,
            "--runs-root", runs, "--shots", SHOTS, "--seeds", "1", *extra]


def extract_args(data, cache, *extra):
    return ["extract", "--dataset", "synthetic", "--preset", "tiny", "--agents", "dino", "--data-root", data,
            "--cache-root", cache, "--shots", SHOTS, "--seeds", "1", "--views", "1", *extra]


def training_keys(data) -> list[str]:
    """The base-class training keys of the 4-shot seed-1 selection (drawn and written if absent)."""
    from pipelines.datasets import load_dataset
    from pipelines.protocols import training_set

    return training_set(load_dataset("synthetic", data), "base2novel", int(SHOTS), 1, data).keys


def selection_file(data) -> Path:
    return Path(data) / "synthetic" / "fewshot" / f"shot_{SHOTS}-seed_1.json"


def image(data, key) -> Path:
    return Path(data) / "synthetic" / "images" / key


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Clean data; a copy whose first training image is empty, extracted (dino) with --on-error skip."""
    from pipelines.datasets import make_synthetic

    root = tmp_path_factory.mktemp("bad_inputs")
    make_synthetic(root / "data", **SMALL)
    training_keys(root / "data")                      # the selection file, so copies share it
    shutil.copytree(root / "data", root / "broken")
    skipped = training_keys(root / "broken")[0]
    image(root / "broken", skipped).write_bytes(b"")
    result = invoke(*extract_args(root / "broken", root / "skip-cache", "--on-error", "skip"))
    assert result.exit_code == 0, result.output
    return {"root": root, "data": root / "data", "broken": root / "broken", "skipped": skipped,
            "skip_cache": root / "skip-cache"}


def without_skipped(workspace, tmp_path) -> Path:
    """A copy of the broken data with the skipped image deleted from the selection file, as the error advises."""
    data = tmp_path / "excluded"
    shutil.copytree(workspace["broken"], data)
    record = json.loads(selection_file(data).read_text())
    record["train"].remove(workspace["skipped"])
    selection_file(data).write_text(json.dumps(record))
    return data


# ------------------------------------------------------------------------------------- datasets and shots

def test_distill_and_evaluate_name_an_unknown_dataset(workspace, tmp_path):
    output = one_line_error(invoke("distill", "--dataset", "nope", "--runs-root", tmp_path / "runs"))
    assert "unknown dataset 'nope'" in output
    run_dir = tmp_path / "run"            # a run's configuration is all evaluate reads before the dataset
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"preset": "tiny", "run": {
        "dataset": "synthetic", "protocol": "base2novel", "student_model": "TransAgent-Tiny-CLIP",
        "student_pretrained": None, "prompt_depth": 0, "n_ctx": 4, "ctx_init": "a photo of a",
        "template": "a photo of a {}."}}))
    output = one_line_error(invoke("evaluate", run_dir, "--dataset", "nope", "--device", "cpu"))
    assert "unknown dataset 'nope'" in output


def test_too_many_shots_for_the_dataset_is_one_line(workspace, tmp_path):
    args = distill_args(workspace["data"], tmp_path / "cache", tmp_path / "runs", "--agents", "none")
    args[args.index("--shots") + 1] = "50"
    assert "50 shots requested" in one_line_error(invoke(*args))


def test_a_folder_class_with_too_few_images_is_named(tmp_path):
    from pipelines.datasets.synthetic import encode_png, render

    for name, count in (("big", 6), ("tiny", 2)):
        (tmp_path / "lab" / name).mkdir(parents=True)
        for index in range(count):
            (tmp_path / "lab" / name / f"{index}.png").write_bytes(encode_png(render(0, index)))
    output = one_line_error(invoke("distill", "--dataset", f"folder:{tmp_path / 'lab'}", "--agents", "none",
                                   "--runs-root", tmp_path / "runs", "--shots", "1"))
    assert str(tmp_path / "lab" / "tiny") in output and "2 images" in output


# ------------------------------------------------------------------------------------- broken images

@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_a_broken_training_image_is_named_before_training(workspace, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    path = image(data, training_keys(data)[1])
    path.write_bytes(b"" if damage == "zero-byte" else path.read_bytes()[:200])
    runs = tmp_path / "runs"
    output = one_line_error(invoke(*distill_args(data, tmp_path / "cache", runs, "--agents", "none",
                                                 "--epochs", "1")))
    assert str(path) in output and "nothing was trained" in output
    assert ("empty file" if damage == "zero-byte" else "truncated") in output
    assert not list(runs.rglob("checkpoint*")) and not list(runs.rglob("metrics.jsonl"))


def test_a_broken_test_image_is_named_before_training_not_at_evaluation(workspace, tmp_path):
    from pipelines.datasets import load_dataset

    data = tmp_path / "data"
    shutil.copytree(workspace["data"], data)
    path = image(data, load_dataset("synthetic", data).test[-1].key)
    path.write_bytes(b"")
    runs = tmp_path / "runs"
    output = one_line_error(invoke(*distill_args(data, tmp_path / "cache", runs, "--agents", "none",
                                                 "--epochs", "1")))
    assert str(path) in output and "nothing was trained" in output
    assert not list(runs.rglob("checkpoint*"))


# ------------------------------------------------------------------------------------- read-only roots

@pytest.fixture
def read_only(monkeypatch):
    """Make paths under the given roots behave like a read-only mount (EROFS) or a root-owned one (EACCES): creating
    directories or opening files for writing fails. chmod cannot do this, tests may run as root."""
    roots: dict[Path, int] = {}

    def refused(path) -> int | None:
        try:
            target = Path(os.fsdecode(path)).absolute()
        except TypeError:            # a file descriptor
            return None
        return next((code for root, code in roots.items() if target == root or root in target.parents), None)

    def fail(code, path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    real_mkdir, real_open, real_builtin_open = os.mkdir, os.open, builtins.open

    def mkdir(path, *args, **kwargs):
        if (code := refused(path)) is not None:
            fail(code, path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writing and (code := refused(path)) is not None:
            fail(code, path)
        return real_open(path, flags, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and (code := refused(file)) is not None:
            fail(code, file)
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(io, "open", builtin_open)

    def make(root, code=errno.EROFS) -> Path:
        roots[Path(root).absolute()] = code
        return Path(root)
    return make


def test_extract_into_a_read_only_cache_root_stops_before_any_model_loads(workspace, tmp_path, read_only):
    cache = read_only(tmp_path / "ro-cache")
    output = one_line_error(invoke(*extract_args(workspace["data"], cache)))
    assert f"--cache-root {cache} is not writable (Read-only file system)" in output


def test_distill_into_a_read_only_runs_root_stops_before_training(workspace, tmp_path, read_only):
    runs = read_only(tmp_path / "ro-runs", errno.EACCES)
    output = one_line_error(invoke(*distill_args(workspace["data"], tmp_path / "cache", runs, "--agents", "none")))
    assert f"--runs-root {runs} is not writable (Permission denied)" in output


def test_prepare_into_a_read_only_data_root_names_the_file_and_the_flag(tmp_path, read_only):
    data = read_only(tmp_path / "ro-data")
    output = one_line_error(invoke("datasets", "prepare", "synthetic", "--data-root", data))
    assert "cannot write" in output and "Read-only file system" in output and f"--data-root {data}" in output


def test_pack_pull_and_merge_into_read_only_places_name_the_flag(workspace, tmp_path, read_only):
    cache = next((workspace["skip_cache"] / "synthetic" / "dino").iterdir())
    packed = invoke("cache", "pack", cache, "-o", tmp_path / "dino.tar")
    assert packed.exit_code == 0, packed.output
    destination = tmp_path / "copy"
    shutil.copytree(cache, destination)

    read_only(tmp_path / "ro", errno.EACCES)
    output = one_line_error(invoke("cache", "pack", cache, "-o", tmp_path / "ro" / "dino.tar"))
    assert "-o/--out" in output and "Permission denied" in output
    output = one_line_error(invoke("cache", "pull", f"file://{tmp_path / 'dino.tar'}", "--cache-root",
                                   tmp_path / "ro" / "cache"))
    assert "--cache-root" in output and "Permission denied" in output
    read_only(destination)
    output = one_line_error(invoke("cache", "merge", cache, destination))
    assert f"DST_DIR {destination} is not writable (Read-only file system)" in output


# ------------------------------------------------------------------------------------- flags

def test_device_cuda_without_a_gpu_names_the_flag(workspace, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = one_line_error(invoke(*distill_args(workspace["data"], tmp_path / "cache", tmp_path / "runs",
                                                 "--agents", "none", "--device", "cuda")), exit_code=2)
    assert "--device" in output and "no CUDA GPU" in output
    output = one_line_error(invoke(*extract_args(workspace["data"], tmp_path / "cache", "--device", "cuda")),
                            exit_code=2)
    assert "--device" in output and "no CUDA GPU" in output
    assert not (tmp_path / "cache").exists()


def test_empty_agents_is_an_error_not_all_eleven(workspace, tmp_path):
    output = one_line_error(invoke(*distill_args(workspace["data"], tmp_path / "cache", tmp_path / "runs",
                                                 "--agents", "")))
    assert "--agents ''" in output and "names no agent" in output
    args = extract_args(workspace["data"], tmp_path / "cache", "--dry-run")
    args[args.index("--agents") + 1] = ""
    assert "names no agent" in one_line_error(invoke(*args))


def test_max_bytes_nan_is_refused_not_unlimited(workspace, tmp_path):
    output = one_line_error(invoke(*extract_args(workspace["data"], tmp_path / "cache", "--dry-run",
                                                 "--max-bytes", "nan")), exit_code=2)
    assert "--max-bytes" in output and "positive number" in output


# ------------------------------------------------------------------------------------- stage 2 on odd caches

def test_a_nan_loss_in_the_first_epoch_promises_no_checkpoint(workspace, tmp_path):
    data = without_skipped(workspace, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(workspace["skip_cache"], cache)
    for chunk in (next((cache / "synthetic" / "dino").glob("*/segments/*.zarr")) / "tokens" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(np.full(chunk.stat().st_size // 2, np.nan, dtype=np.float16).tobytes())
    output = one_line_error(invoke(*distill_args(data, cache, tmp_path / "runs", "--agents", "dino",
                                                 "--epochs", "1")))
    assert "non-finite at epoch 1" in output and "no checkpoint was written" in output
    assert "is kept" not in output and not list((tmp_path / "runs").rglob("checkpoint*"))


def test_distill_after_on_error_skip_names_the_skipped_images_and_how_to_leave_them_out(workspace, tmp_path):
    output = one_line_error(invoke(*distill_args(workspace["broken"], workspace["skip_cache"], tmp_path / "runs",
                                                 "--agents", "dino", "--epochs", "1")))
    assert workspace["skipped"] in output and "--on-error skip" in output
    assert str(selection_file(workspace["broken"])) in output and "fill them with" not in output
    # following the advice works
    data = without_skipped(workspace, tmp_path)
    result = invoke(*distill_args(data, workspace["skip_cache"], tmp_path / "runs", "--agents", "dino",
                                  "--epochs", "0"))
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------- image decoding

def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped_in_both_stages(tmp_path):
    from PIL import Image

    from distill.data import load_image
    from extract.families import ExtractContext
    from extract.families.t2i import view0_pixels
    from pipelines.presets import student_spec

    levels = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    expected = (levels.astype(np.int64) * 255 + 32767) // 65535
    student = np.asarray(load_image(tmp_path, "deep.png"))
    assert student.dtype == np.uint8 and np.array_equal(student[..., 0], expected)
    assert (student == 255).mean() < 0.01
    ctx = ExtractContext(dataset="x", image_root=tmp_path, keys=["deep.png"], classnames=["a"],
                         template="a photo of a {}.", student=student_spec("tiny"))
    agent = view0_pixels(ctx, ["deep.png"], 40, mean=(0, 0, 0), std=(1, 1, 1)).numpy()
    assert (agent >= 0.999).mean() < 0.01


def test_caches_carry_the_image_decoding_version_and_old_ones_are_not_mixed(workspace, tmp_path, monkeypatch):
    from cache_schema.views import IMAGE_DECODING_VERSION
    from distill.data import open_teachers
    from extract.families import i2t, t2i, vision
    from pipelines.datasets import load_dataset
    from pipelines.extraction import ExtractOptions, build_jobs

    assert IMAGE_DECODING_VERSION >= 2
    current = next((workspace["skip_cache"] / "synthetic" / "dino").iterdir())
    fields = json.loads((current / "manifest.json").read_text())["fields"]["family"]
    assert fields["image_decoding"] == IMAGE_DECODING_VERSION
    ctx = build_jobs(ExtractOptions(dataset="synthetic", data_root=workspace["data"], preset="tiny", agents="sd",
                                    shots=(4,)))[0].ctx
    assert t2i.fingerprint_fields(ctx)["image_decoding"] == i2t.fingerprint_fields(ctx)["image_decoding"] == \
        IMAGE_DECODING_VERSION

    # a cache made before the version existed (no image_decoding field) ...
    made_before = vision.fingerprint_fields
    monkeypatch.setattr(vision, "fingerprint_fields",
                        lambda ctx: {k: v for k, v in made_before(ctx).items() if k != "image_decoding"})
    old_cache = tmp_path / "cache"
    result = invoke(*extract_args(workspace["data"], old_cache))
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(vision, "fingerprint_fields", made_before)
    # ... is refused by stage 2, naming both versions
    output = one_line_error(invoke(*distill_args(workspace["data"], old_cache, tmp_path / "runs", "--agents",
                                                 "dino", "--epochs", "1")))
    assert "decoded by version 1" in output and f"version {IMAGE_DECODING_VERSION}" in output
    # ... and next to a re-extracted one, the re-extracted one is used (no "several caches match")
    shutil.copytree(current, old_cache / "synthetic" / "dino" / current.name)
    dataset = load_dataset("synthetic", workspace["data"])
    bank = open_teachers(old_cache, "synthetic", dataset.split_hash, ["dino"], dataset.classnames[:2], "base")
    assert Path(bank.paths["dino"]).name == current.name

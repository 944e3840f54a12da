"""Attacks on what stage 2 trusts in a run directory and on how folder datasets are named.

* a pickled checkpoint whose unpickling would create a file (`evaluate`, `distill --resume`): refused, file absent
* a damaged safetensors checkpoint: one line naming the file
* the same images under two data roots: one fingerprint, one cache path, one run directory (`cache ls` sees them)
* two different folders called alike: the second is refused (run directory, caches), not confused with the first
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.datasets.synthetic import encode_png, render

CLASSES = ("cat", "dog", "fox", "owl")
PER_CLASS = 5   # 50/20/30 per class: 2 train, 1 val, 2 test
SHOTS = "2"
CHECKPOINT, LEGACY_CHECKPOINT = "checkpoint.safetensors", "checkpoint.pt"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    """The message of a clean failure: exit 1 through click, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output
    return result.output


def make_folder(directory: Path, classes=CLASSES, first_index: int = 0) -> Path:
    """<directory>/<class>/<n>.png, drawn from the synthetic renderer (class c looks like synthetic class c)."""
    for label, name in enumerate(classes):
        (directory / name).mkdir(parents=True, exist_ok=True)
        for index in range(first_index, first_index + PER_CLASS):
            (directory / name / f"{index:04d}.png").write_bytes(encode_png(render(label, index)))
    return directory


def extract_args(dataset, cache, *extra):
    return ["extract", "--dataset", dataset, "--preset", "tiny", "--agents", "dino", "--cache-root", cache,
            "--shots", SHOTS, "--seeds", "1", "--views", "1", *extra]


def distill_args(dataset, cache, runs, *extra):
    return ["distill", "--dataset", dataset, "--preset", "tiny", "--cache-root", cache, "--runs-root", runs,
            "--shots", SHOTS, "--seeds", "1", *extra]


def run_dir_of(output: str) -> Path:
    return Path(output.strip().splitlines()[-1].strip())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One folder dataset `lab` under root a/, its copy under root b/, a dino cache and a finished 1-epoch run."""
    root = tmp_path_factory.mktemp("names")
    first = make_folder(root / "a" / "lab")
    shutil.copytree(first, root / "b" / "lab")
    extracted = invoke(*extract_args(f"folder:{first}", root / "cache"))
    assert extracted.exit_code == 0, extracted.output
    trained = invoke(*distill_args(f"folder:{first}", root / "cache", root / "runs", "--agents", "dino",
                                   "--epochs", "1"))
    assert trained.exit_code == 0, trained.output
    return {"root": root, "first": first, "copy": root / "b" / "lab", "run": run_dir_of(trained.output)}


# ------------------------------------------------------------------------------------------- checkpoints

class CreatesAFile:
    """Unpickling this calls open(marker, "w"): the file appears if and only if the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_evaluate_refuses_a_pickled_checkpoint_that_would_create_a_file(lab, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lab["run"], run)
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        (run / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "prompts": CreatesAFile(marker)}, run / LEGACY_CHECKPOINT)

    result = invoke("evaluate", run, "--device", "cpu")
    assert not marker.exists()
    output = one_line_error(result)
    assert "refused" in output and LEGACY_CHECKPOINT in output and "io.open" in output


def test_distill_resume_refuses_a_pickled_checkpoint_that_would_create_a_file(lab, tmp_path):
    runs = tmp_path / "runs"
    relative = lab["run"].relative_to(lab["root"] / "runs")
    shutil.copytree(lab["run"], runs / relative)
    (runs / relative / "final.json").unlink()
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        (runs / relative / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 0, "prompts": CreatesAFile(marker)}, runs / relative / LEGACY_CHECKPOINT)

    result = invoke(*distill_args(f"folder:{lab['first']}", lab["root"] / "cache", runs, "--agents", "dino",
                                  "--epochs", "1", "--resume"))
    assert not marker.exists()
    assert "refused" in one_line_error(result)


def test_checkpoints_are_safetensors_not_pickles_and_old_tensor_pickles_still_evaluate(lab, tmp_path):
    from safetensors import safe_open

    from distill import checkpoints

    assert not (lab["run"] / LEGACY_CHECKPOINT).exists()
    with safe_open(str(lab["run"] / CHECKPOINT), framework="pt") as handle:
        assert handle.metadata()["format"] == checkpoints.FORMAT
        assert any(name.startswith("prompts/") for name in handle.keys())
    # a checkpoint.pt written by an earlier version (tensors + numpy RNG state) still loads, without running code
    state = checkpoints.load(lab["run"] / CHECKPOINT)
    torch.save(state, tmp_path / LEGACY_CHECKPOINT)
    legacy = checkpoints.load(tmp_path / LEGACY_CHECKPOINT)
    for part in ("prompts", "gates"):
        assert legacy[part].keys() == state[part].keys()
        assert all(torch.equal(legacy[part][name], state[part][name]) for name in state[part])
    assert np.array_equal(legacy["rng"]["numpy"][1], state["rng"]["numpy"][1])


def test_a_damaged_safetensors_checkpoint_is_one_line_naming_the_file(lab, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lab["run"], run)
    (run / CHECKPOINT).write_bytes(b"\xff" * 64)
    output = one_line_error(invoke("evaluate", run, "--device", "cpu"))
    assert CHECKPOINT in output


# ------------------------------------------------------------------------------------------- folder names

def test_the_same_images_at_two_roots_share_fingerprint_cache_and_run(lab):
    root = lab["root"]
    again = invoke(*extract_args(f"folder:{lab['copy']}", root / "cache"))
    assert again.exit_code == 0, again.output
    assert "1 already complete" in again.output                      # same fingerprint, same path
    caches = sorted(path.relative_to(root / "cache").as_posix() for path in (root / "cache").glob("*/*/*")
                    if path.is_dir())
    assert len(caches) == 1 and caches[0].startswith("folder-lab/dino/")
    manifest = json.loads((root / "cache" / caches[0] / "manifest.json").read_text())
    assert str(root) not in json.dumps(manifest["fields"])            # no absolute path in the fingerprint
    assert manifest["fields"]["dataset"]["classnames"] == list(CLASSES)

    listed = invoke("cache", "ls", "--cache-root", root / "cache")
    assert "folder-lab" in listed.output and "dino" in listed.output
    assert "dino" in invoke("cache", "ls", "--cache-root", root / "cache", "--dataset", f"folder:{lab['copy']}").output

    final = (lab["run"] / "final.json").read_bytes()
    reused = invoke(*distill_args(f"folder:{lab['copy']}", root / "cache", root / "runs", "--agents", "dino",
                                  "--epochs", "1"))
    assert reused.exit_code == 0, reused.output
    assert run_dir_of(reused.output) == lab["run"] and (lab["run"] / "final.json").read_bytes() == final
    assert lab["run"].relative_to(root / "runs").parts[0] == "folder-lab"


def test_two_different_folders_called_alike_are_refused_not_confused(lab, tmp_path):
    from extract.runner import planned_path
    from pipelines.extraction import ExtractOptions, build_jobs

    other = make_folder(tmp_path / "c" / "lab", classes=("ant", "bee", "cow", "elk"))
    root = lab["root"]
    final = (lab["run"] / "final.json").read_bytes()
    output = one_line_error(invoke(*distill_args(f"folder:{other}", root / "cache", root / "runs", "--agents",
                                                 "dino", "--epochs", "1")))
    assert "dataset.classnames" in output and "dataset.split_hash" in output        # not the first folder's cache
    zero_shot = ("--agents", "none", "--epochs", "0", "--prompt-depth", "0")
    first = invoke(*distill_args(f"folder:{lab['first']}", root / "cache", root / "runs", *zero_shot))
    assert first.exit_code == 0, first.output
    first_final = (run_dir_of(first.output) / "final.json").read_bytes()
    output = one_line_error(invoke(*distill_args(f"folder:{other}", root / "cache", root / "runs", *zero_shot)))
    assert "--dataset-name" in output and "--force" in output                      # not the first folder's run
    assert (lab["run"] / "final.json").read_bytes() == final
    assert (run_dir_of(first.output) / "final.json").read_bytes() == first_final

    def cache_of(dataset, name=None):
        options = ExtractOptions(dataset=dataset, dataset_name=name, preset="tiny", agents="dino", shots=(2,),
                                 cache_root=root / "cache", views=1)
        return planned_path(build_jobs(options)[0], root / "cache")

    assert cache_of(f"folder:{other}") != cache_of(f"folder:{lab['first']}")
    assert cache_of(f"folder:{other}", "lab-c").parent.parent.name == "lab-c"

    named = invoke(*distill_args(f"folder:{other}", root / "cache", root / "runs", *zero_shot,
                                 "--dataset-name", "lab-c"))
    assert named.exit_code == 0, named.output
    assert run_dir_of(named.output).relative_to(root / "runs").parts[0] == "lab-c"


def test_dataset_name_must_be_a_plain_directory_name(lab):
    for bad in ("../up", "a/b", "x[1]", ""):
        output = one_line_error(invoke(*distill_args(f"folder:{lab['first']}", lab["root"] / "cache",
                                                     lab["root"] / "runs", "--dataset-name", bad)))
        assert "--dataset-name" in output

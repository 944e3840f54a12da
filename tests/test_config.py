"""One configuration: the dataclass tree, its flags and the YAML files agree; --set typing and errors; precedence;
the base2new alias; config.yaml reproduces a run; the run directory's hash."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distill.config import DistillConfig, LossWeights, OptimConfig
from pipelines.cli import main
from pipelines.commands.distill import distill as distill_cli
from pipelines.commands.extract import extract as extract_cli
from pipelines.config import ConfigError
from pipelines.config.cli import flag_groups, layers
from pipelines.config.distill import DistillRun, digest, resolve, run_name
from pipelines.config.extract import ExtractOptions
from pipelines.config.files import read_config, shipped_names
from pipelines.config.tree import build, defaults, leaves, parse_assignment, plain
from pipelines.protocols import PROTOCOLS


def resolved(*args) -> DistillRun:
    """The configuration `distill ARGS` would run, without running it."""
    context = distill_cli.make_context("distill", [str(a) for a in args])
    with context:
        return resolve(layers(context, DistillRun).merged())


def test_cli_yaml_and_dataclass_agree():
    """Every leaf is reachable (a flag, and always --set), a flag's default is the field's, the shipped files hold
    only keys of the tree, and the stage's defaults are the tree's."""
    params = {param.name: param for param in distill_cli.params}
    for name, group in flag_groups(DistillRun).items():
        assert name in params and set(group[0].flags) <= set(params[name].opts), name
        assert params[name].default in (None, False, ()), name   # unset: the field's default applies
    for key, value in defaults(DistillRun).items():
        text = str(value) if isinstance(value, (str, Path)) else json.dumps(plain(value))   # text: as typed
        assert parse_assignment(DistillRun, f"{key}={text}") == {key: value}, key
    assert set(shipped_names()) == set(PROTOCOLS)
    for name in shipped_names():
        values = read_config(DistillRun, name)
        assert values["protocol"] == name and set(values) <= set(leaves(DistillRun))
    config = resolved()   # paper preset, base2novel: nothing but the defaults
    assert dataclasses.asdict(config.optim) == dataclasses.asdict(OptimConfig())
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(DistillConfig)} == \
        {f.name: getattr(DistillConfig(), f.name) for f in dataclasses.fields(DistillConfig)}
    help_text = CliRunner().invoke(main, ["distill", "--help"]).output
    for flag in ("--lambda-lac", "--epochs", "--prompt-depth", "--router", "--mac-student", "--views", "--layers",
                 "--dataset-name", "--report-to", "--config", "--set", "--lr", "--batch-size"):
        assert flag in help_text, flag
    assert f"[default: {LossWeights().lac}]" in help_text


def test_extract_cli_and_dataclass_agree():
    params = {param.name: param for param in extract_cli.params}
    for name, group in flag_groups(ExtractOptions, skip=("dataset",)).items():
        assert name in params and set(group[0].flags) <= set(params[name].opts), name
    for key, value in defaults(ExtractOptions).items():
        text = str(value) if isinstance(value, (str, Path)) else json.dumps(plain(value))
        assert parse_assignment(ExtractOptions, f"{key}={text}") == {key: value}, key
    context = extract_cli.make_context("extract", ["--set", "views=2", "--views", "3", "--token-pool", "2",
                                                   "--set", "max_bytes=inf", "--layers", "all"])
    config = build(ExtractOptions, layers(context, ExtractOptions, skip=("dataset",)).merged())
    assert (config.views, config.token_pool, config.max_bytes, config.layers) == (3, 2, float("inf"), None)
    for bad in (["--max-bytes", "0"], ["--max-bytes", "nan"], ["--layers", "-1"], ["--wait", "nan"]):
        result = CliRunner().invoke(main, ["extract", *bad, "--dry-run"])
        assert result.exit_code == 2 and bad[0] in result.output, (bad, result.output)


def test_shots_and_seeds_are_lists_and_each_pair_is_a_run():
    cells = resolved("--shots", "1,4", "--seeds", "2,3").cells()
    assert [(cell.shot, cell.seed) for cell in cells] == [(1, 2), (1, 3), (4, 2), (4, 3)]
    assert len({run_name(cell) for cell in cells}) == 4


def test_set_values_are_typed_from_the_fields_and_errors_name_the_key():
    assert parse_assignment(DistillRun, "optim.lr=5e-4") == {"optim.lr": 5e-4}     # YAML reads 5e-4 as text
    assert parse_assignment(DistillRun, "optim.epochs=3") == {"optim.epochs": 3}
    assert parse_assignment(DistillRun, "layers=7,3") == {"layers": (3, 7)}
    assert parse_assignment(DistillRun, "layers=all") == {"layers": None}
    assert parse_assignment(DistillRun, "shots=1,2") == {"shots": (1, 2)}
    assert parse_assignment(DistillRun, "prompts.ctx_init=null") == {"prompts.ctx_init": None}
    assert parse_assignment(DistillRun, "loss.renormalize_language=false") == {"loss.renormalize_language": False}
    assert parse_assignment(DistillRun, "pins={dino: abc}") == {"pins": {"dino": "abc"}}
    assert parse_assignment(DistillRun, "agents=dino,mae") == {"agents": "dino,mae"}   # text stays text
    assert parse_assignment(DistillRun, "prompts.template=null") == {"prompts.template": "null"}
    assert parse_assignment(DistillRun, "protocol=base2new") == {"protocol": "base2novel"}
    # a flag's name is a key too (the ablations of earlier versions are written with them)
    assert parse_assignment(DistillRun, "lambda_vac=0.5") == {"loss.vac": 0.5}
    assert parse_assignment(DistillRun, "prompt-depth=3") == {"prompts.depth_vision": 3, "prompts.depth_text": 3}
    for text, message in (("optim.epochs=1.5", "optim.epochs: expected an integer"),
                          ("optim.lr=fast", "optim.lr: expected a number"),
                          ("optim.lrr=1", "unknown configuration key 'optim.lrr'; did you mean optim.lr"),
                          ("gates.router=conv", "gates.router: 'conv' is not one of mlp, noisy-linear"),
                          ("optim.batch_size=0", "below the minimum 1"), ("optim.lr", "expected KEY=VALUE"),
                          ("seeds=", "at least one value"), ("protocol=all", "not one of base2novel")):
        with pytest.raises(ConfigError, match=message):
            parse_assignment(DistillRun, text)


def test_precedence_defaults_file_set_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  lr: 0.1\n  epochs: 3\nloss: {lac: 2}\nprotocol: fewshot\n")
    assert resolved("--config", path).optim == OptimConfig(lr=0.1, epochs=3)
    assert resolved("--config", path, "--set", "optim.lr=0.2").optim.lr == 0.2
    config = resolved("--config", path, "--set", "optim.lr=0.2", "--lr", "0.3", "--lambda-lac", "4")
    assert (config.optim.lr, config.optim.epochs, config.loss.lac, config.protocol) == (0.3, 3, 4.0, "fewshot")
    # the protocol's file sits below the user's layers, the preset's student above the defaults
    assert resolved("--protocol", "fewshot").optim.epochs == 50
    assert resolved("--config", "fewshot", "--epochs", "7").optim.epochs == 7
    tiny = resolved("--preset", "tiny", "--protocol", "cross")
    assert (tiny.student.model, tiny.student.pretrained, tiny.prompts.depth_vision) == ("TransAgent-Tiny-CLIP", None, 3)
    assert resolved("--protocol", "cross").prompts.depth_text == 3


def test_base2new_is_base2novel():
    assert resolved("--protocol", "base2new").protocol == "base2novel"
    assert resolved("--config", "base2new", "--protocol", "base2new") == resolved()


def test_bad_configuration_files_are_one_line_errors(tmp_path):
    cases = {"unknown.yaml": ("optim:\n  lrr: 1\n", "unknown.yaml: unknown configuration key 'optim.lrr'"),
             "type.yaml": ("optim: {epochs: many}\n", "type.yaml: optim.epochs: expected an integer"),
             "section.yaml": ("optim: 3\n", "section.yaml: optim is a section"),
             "broken.yaml": ("optim: [1,\n", "broken.yaml line 2: not valid YAML"),
             "list.yaml": ("- 1\n", "list.yaml: expected a mapping"),
             "object.yaml": ("x: !!python/object/apply:os.system [echo hi]\n", "object.yaml line 1: not valid YAML")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / name)])
        assert result.exit_code == 1 and message in result.output, (name, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = CliRunner().invoke(main, ["distill", "--config", "nope"])
    assert result.exit_code == 1 and "no shipped configuration of that name" in result.output
    result = CliRunner().invoke(main, ["distill", "--set", "optim.epochs=x"])
    assert result.exit_code == 1 and "--set optim.epochs: expected an integer" in result.output


def test_run_directory_hash_covers_every_number_changing_setting():
    base = resolved()
    assert run_name(base).startswith("default-")
    lr = resolved("--set", "optim.lr=0.01")
    assert run_name(lr).startswith("lr-0.01-") and digest(lr) != digest(base)
    assert digest(resolved("--set", "optim.lr=0.0025")) == digest(base)          # the default, written out
    for unchanged in (["--device", "cpu"], ["--workers", "3"], ["--runs-root", "/elsewhere"], ["--report-to",
                                                                                               "tensorboard"]):
        assert run_name(resolved(*unchanged)) == run_name(base), unchanged
    # a default that changes (here: the momentum) changes the directory, so no stale final.json is reused
    other = dataclasses.replace(base, optim=dataclasses.replace(base.optim, momentum=0.8))
    assert digest(other) != digest(base)
    assert run_name(resolved("--preset", "tiny")).startswith("default-")        # the preset's own student
    assert run_name(resolved("--lambda-vac", "0.5", "--agents", "dino,sd")).startswith("lvac-0.5_agents-dino+sd-")


def test_config_yaml_reproduces_the_run(tmp_path):
    """`distill --config base2novel --set optim.lr=0.01` writes config.yaml; that file gives the same directory
    (reused) and, trained again elsewhere, the same numbers."""
    from pipelines.datasets import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=4, per_class=(2, 1, 1))
    earlier = tmp_path / "runs" / "synthetic" / "base2novel" / "shots2" / "seed1" / "default"
    earlier.mkdir(parents=True)   # an earlier version's name: never reused, and said once
    args = ["distill", "--config", "base2novel", "--set", "optim.lr=0.01", "--preset", "tiny", "--dataset",
            "synthetic", "--agents", "none", "--shots", "2", "--epochs", "1", "--device", "cpu",
            "--data-root", tmp_path / "data", "--cache-root", tmp_path / "cache", "--runs-root", tmp_path / "runs"]
    first = CliRunner().invoke(main, [str(a) for a in args])
    assert first.exit_code == 0, first.output
    run_dir = Path(first.output.strip().splitlines()[-1].strip())
    assert "holds run directories of an earlier version (default); they are not reused" in first.output
    assert run_dir.name.startswith("lr-0.01_epochs-1_agents-none-") and (run_dir / "final.json").exists()
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["optim"]["lr"] == 0.01 and written["optim"]["epochs"] == 1 and written["seeds"] == [1]
    again = CliRunner().invoke(main, ["distill", "--config", str(run_dir / "config.yaml")])
    assert again.exit_code == 0 and Path(again.output.strip().splitlines()[-1].strip()) == run_dir
    elsewhere = CliRunner().invoke(main, ["distill", "--config", str(run_dir / "config.yaml"), "--runs-root",
                                          str(tmp_path / "other")])
    assert elsewhere.exit_code == 0, elsewhere.output
    retrained = Path(elsewhere.output.strip().splitlines()[-1].strip())
    assert retrained.relative_to(tmp_path / "other") == run_dir.relative_to(tmp_path / "runs")
    assert json.loads((retrained / "final.json").read_text())["accuracy"] == \
        json.loads((run_dir / "final.json").read_text())["accuracy"]

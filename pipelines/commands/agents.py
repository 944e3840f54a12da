"""`transagent agents ls|check|convert`: what each agent is and emits, the loading preflight, and conversions of
checkpoints that are not on the hub."""
from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import click

from extract.agents import registry
from extract.convert import converter_names, get_converter
from pipelines import options as opt
from pipelines.devices import resolve_device
from pipelines.datasets import DatasetError
from pipelines.config.extract import ExtractOptions
from pipelines.presets import AGENTS, register_model_configs, resolve_agents, student_spec

# Converter keyword -> the flag that sets it (the CLI spelling in errors).
CONVERT_FLAGS = {"base": "--base", "vision_tower": "--vision-tower", "dtype": "--dtype"}


@click.group()
def agents():
    """The teacher agents: list them, check that they load, convert checkpoints published in other formats."""


@agents.command("ls")
@opt.preset
@opt.agents
@click.option("--json", "as_json", is_flag=True, help="One JSON object per agent instead of the table.")
def ls(preset, agents, as_json):
    """Each agent's family, weights source, emitted arrays and description (imports no model code)."""
    specs = registry()
    order = [name for name in AGENTS if name in specs] + [name for name in specs if name not in AGENTS]
    try:
        names = resolve_agents(agents, tuple(order))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    entries = [describe(specs[name], preset) for name in names]
    if as_json:
        for entry in entries:
            click.echo(json.dumps(entry))
        return
    student = student_spec(preset)
    click.echo(f"preset {preset}: student {student.model} ({student.pretrained or 'random init'}), "
               f"{student.image_size} px, {student.grid}x{student.grid} tokens of width {student.width}")
    width = max(len(entry["name"]) for entry in entries) if entries else 0
    families = max(len(entry["family"]) for entry in entries) if entries else 0
    indent = " " * (width + families + 4)
    for entry in entries:
        click.echo(f"{entry['name']:<{width}}  {entry['family']:<{families}}  {entry['source']}")
        click.echo(f"{indent}emits: {', '.join(entry['emits'])}")
        click.echo(f"{indent}{entry['description']}")
    if preset == "paper":
        click.echo("Any agent loads from a local transformers-format copy with `extract --agent-path NAME=DIR`. "
                   "vitdet and mae are downloaded and converted at first use (by hand: `transagent agents convert "
                   "vitdet|mae FILE DIR`, then --agent-path vitdet=DIR); shikra needs --agent-path shikra=DIR "
                   "(`transagent agents convert shikra`), else it is skipped.")


def describe(spec, preset: str) -> dict:
    """What `agents ls` shows for one agent under a preset."""
    source = ("tiny random weights, built locally from the agent's tiny config (no download)" if preset == "tiny"
              else spec.source.describe())
    return {"name": spec.name, "family": spec.family, "source": source, "emits": list(spec.emits),
            "description": spec.description}


@agents.command()
@click.option("--dataset", default=None,
              help="Also estimate each agent's cache for this dataset and give --forward its images.")
@opt.extract_protocol
@opt.shots
@opt.seeds
@opt.data_root
@opt.cache_root
@opt.preset
@opt.agents
@click.option("--agent-path", "agent_paths", multiple=True, callback=opt.parse_agent_pairs,
              help="AGENT=PATH: load an agent from a local directory, as extract does.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto.")
@click.option("--dtype", "compute_dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True, help="Compute dtype (auto: float16 on a GPU, float32 on the CPU).")
@click.option("--forward", is_flag=True, help="Also run one batch of --dataset and measure its peak memory.")
@click.option("--strict", is_flag=True, help="A skipped agent (e.g. shikra without --agent-path) is an error too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per agent instead of the rows.")
def check(dataset, protocol, shots, seeds, data_root, cache_root, preset, agents, agent_paths, device, compute_dtype,
          forward, strict, as_json):
    """Load each agent as extract would (one at a time, then freed) and report it; exit 1 if any cannot run.

    A row: source (hub id@revision or local path), resolved commit, parameters, dtype, the missing/unexpected
    keys its allowance let through, weights sha256, device memory (exact weight bytes, + one batch with --forward)
    and the cache it would write for --dataset.
    """
    from pipelines.agent_check import format_result, plan, run_checks, skipped_results, summary  # imports torch

    if forward and dataset is None:
        raise click.UsageError("--forward runs one batch of a dataset: give --dataset")
    if device == "auto":
        device = resolve_device(device)
    dtype = compute_dtype if compute_dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    options = ExtractOptions(dataset=dataset or "", data_root=data_root, cache_root=cache_root, preset=preset,
                             agents=agents, device=device, agent_paths=agent_paths, shots=shots, seeds=seeds,
                             protocol=protocol)
    try:
        items, skipped = plan(options, with_dataset=dataset is not None)
    except (ValueError, OSError, KeyError, DatasetError) as error:
        raise click.ClickException(str(error.args[0] if isinstance(error, KeyError) else error)) from None
    if preset == "tiny":
        register_model_configs()
    for item in items:
        item.request.device, item.request.dtype = device, dtype
        if item.ctx is not None:
            item.ctx.device = device

    def show(result):
        click.echo(json.dumps(result.to_dict()) if as_json else format_result(result))

    results = run_checks(items, options, forward=forward, on_result=show)
    for result in skipped_results(skipped):
        show(result)
        results.append(result)
    click.echo(summary(results), err=as_json)
    failed = [result.agent for result in results if result.status == "failed"]
    if failed or (strict and skipped):
        reasons = ([f"cannot run: {', '.join(failed)}"] if failed else []) + (
            [f"skipped under --strict: {', '.join(skipped)}"] if strict and skipped else [])
        raise click.ClickException("; ".join(reasons))


@agents.command()
@click.argument("name")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="shikra: the LLaMA-7B directory (Hugging Face format) the delta is added to.")
@click.option("--vision-tower", default=None,
              help="shikra: CLIP ViT-L/14 hub id or local directory  [default: openai/clip-vit-large-patch14]")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="shikra: dtype of the written weights  [default: float16]")
def convert(name, source, output, base, vision_tower, dtype):
    """Convert NAME's published checkpoint SOURCE into the directory OUTPUT (then: extract --agent-path NAME=OUTPUT).

    \b
    vitdet SOURCE OUTPUT                 detectron2 .pkl/.pth (e.g. model_final_61ccd1.pkl)
    mae SOURCE OUTPUT                    FAIR MAE pre-training .pth (e.g. mae_pretrain_vit_base.pth)
    shikra DELTA OUTPUT --base LLAMA_DIR [--vision-tower ID_OR_DIR] [--dtype float16]
    """
    if name not in converter_names():
        raise click.ClickException(f"no converter for {name!r}; known: {', '.join(converter_names()) or '(none)'} "
                                   "(the other agents load from the hub or a transformers directory as they are)")
    converter = get_converter(name)
    given = {key: value for key, value in (("base", base), ("vision_tower", vision_tower), ("dtype", dtype))
             if value is not None}
    check_converter_options(name, converter, given)
    if not source.exists():
        raise click.ClickException(f"{name} conversion: source {source} does not exist")
    try:
        written = converter(source, output, **given)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:  # bad input, not a bug: no traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise click.ClickException(f"{name} conversion failed: {message}") from None
    click.echo(f"converted {name}: {written}")
    click.echo(f"use it with: transagent extract --preset paper --agent-path {name}={written}")


def check_converter_options(name: str, converter, given: dict) -> None:
    """Flags the converter does not take are an error, and so are the ones it needs that are missing."""
    parameters = inspect.signature(converter).parameters
    takes = [key for key in CONVERT_FLAGS if key in parameters]
    extra = [CONVERT_FLAGS[key] for key in given if key not in parameters]
    if extra:
        allowed = ", ".join(CONVERT_FLAGS[key] for key in takes) or "none"
        raise click.UsageError(f"{', '.join(extra)} does not apply to the {name} converter (its options: {allowed})")
    missing = [CONVERT_FLAGS[key] for key in takes if parameters[key].default is inspect.Parameter.empty
               and key not in given]
    if missing:
        raise click.UsageError(f"the {name} converter needs {', '.join(missing)}")

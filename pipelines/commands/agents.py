"""`transagent agents ls|convert`: what each agent is and emits; convert checkpoints that are not on the hub."""
from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import click

from pipelines import options as opt

# Converter keyword -> the flag that sets it (the CLI spelling in errors).
CONVERT_FLAGS = {"base": "--base", "vision_tower": "--vision-tower", "dtype": "--dtype"}


@click.group()
def agents():
    """The teacher agents: list them, convert checkpoints published in other formats."""


@agents.command("ls")
@opt.preset
@opt.agents
@click.option("--json", "as_json", is_flag=True, help="One JSON object per agent instead of the table.")
def ls(preset, agents, as_json):
    """Each agent's family, weights source, emitted arrays and description (imports no model code)."""
    from extract.agents import registry
    from pipelines.presets import AGENTS, resolve_agents, student_spec

    specs = registry()
    order = [name for name in AGENTS if name in specs] + [name for name in specs if name not in AGENTS]
    try:
        names = resolve_agents(agents, tuple(order))
    except ValueError as error:
        raise click.ClickException(str(error))
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
        click.echo("Any agent loads from a local transformers-format copy with `extract --agent-path NAME=DIR`; "
                   "vitdet and shikra need one (`transagent agents convert`).")


def describe(spec, preset: str) -> dict:
    """What `agents ls` shows for one agent under a preset."""
    source = ("tiny random weights, built locally from the agent's tiny config (no download)" if preset == "tiny"
              else spec.source.describe())
    return {"name": spec.name, "family": spec.family, "source": source, "emits": list(spec.emits),
            "description": spec.description}


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
    shikra DELTA OUTPUT --base LLAMA_DIR [--vision-tower ID_OR_DIR] [--dtype float16]
    """
    from extract.convert import converters

    found = converters()
    if name not in found:
        raise click.ClickException(f"no converter for {name!r}; known: {', '.join(found) or '(none)'} "
                                   "(the other agents load from the hub or a transformers directory as they are)")
    converter = found[name]
    given = {key: value for key, value in (("base", base), ("vision_tower", vision_tower), ("dtype", dtype))
             if value is not None}
    check_converter_options(name, converter, given)
    if not source.exists():
        raise click.ClickException(f"{name} conversion: source {source} does not exist")
    try:
        written = converter(source, output, **given)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:  # bad input, not a bug: no traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise click.ClickException(f"{name} conversion failed: {message}")
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

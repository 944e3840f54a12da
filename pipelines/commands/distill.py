"""`transagent distill` (stage 2, seeds one after another) and `transagent evaluate RUN_DIR`."""
from __future__ import annotations

from pathlib import Path

import click

from pipelines import options as opt
from pipelines import progress as bars



@click.command()
@opt.dataset
@opt.dataset_name
@opt.data_root
@opt.cache_root
@opt.runs_root
@opt.preset
@opt.agents
@opt.protocol
@opt.shots
@opt.seeds
@click.option("--lambda-vac", type=float, default=1.0, show_default=True, help="Weight of L_VAC (vision).")
@click.option("--lambda-lac", type=float, default=25.0, show_default=True, help="Weight of L_LAC (language).")
@click.option("--lambda-rel", type=float, default=1.0, show_default=True, help="Weight of L_REL (bert relations).")
@click.option("--lambda-mac", type=float, default=1.0, show_default=True, help="Weight of L_MAC (multi-modal).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="L_MAC temperature T.")
@click.option("--mac-student", type=click.Choice(["standardized", "logits"]), default="standardized",
              show_default=True, help="L_MAC's student scores: the class logits standardised per image like the "
                                      "agents' scores, or the raw logits (the earlier form).")
@click.option("--router", type=click.Choice(["mlp", "noisy-linear"]), default="mlp", show_default=True,
              help="Gate type; noisy-linear reproduces the official router.")
@click.option("--views", type=click.IntRange(1), default=None, help="Cached views to draw from (default: all).")
@click.option("--layers", default=None, callback=lambda ctx, param, value: _parse_layers(value),
              help="0-based agent layers distilled by L_VAC, numbered as extract --layers numbers them, e.g. "
                   "3,7,11; a subset of the layers the vision caches store (default: all they store).")
@click.option("--epochs", type=click.IntRange(0), default=None, help="Default: 20 (base2novel), 50 (fewshot).")
@click.option("--prompt-depth", type=click.IntRange(0), default=None, help="Default: 9 (3 for cross/dg).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Loader processes building whole batches (images and teacher rows).")
@click.option("--eval-initial", is_flag=True, help="Also evaluate the prompts before training (epoch 0).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Delete an existing run directory and start over.")
@click.option("--stop-after-epoch", type=click.IntRange(1), default=None, hidden=True)
@opt.cache_fingerprints
@opt.report_to
@bars.quiet_option
def distill(dataset, dataset_name, data_root, cache_root, runs_root, preset, agents, protocol, shots, seeds, lambda_vac,
            lambda_lac, lambda_rel, lambda_mac, temperature, mac_student, router, views, layers, epochs, prompt_depth,
            device,
            precision, workers, eval_initial, resume, force, stop_after_epoch, pins, report_to):
    """Stage 2: train prompts + gates against the caches; evaluate the last epoch."""
    from cache_schema import CacheError
    from pipelines.distillation import DistillOptions
    from pipelines.distillation import distill as run_distill

    if protocol == "all":
        raise click.BadParameter("distill trains one protocol at a time", param_hint="--protocol")
    device = opt.check_device(_resolve_device(device))
    opt.require_writable(runs_root, "--runs-root")
    results = []
    for seed in seeds:
        options = DistillOptions(
            dataset=dataset, data_root=data_root, cache_root=cache_root, runs_root=runs_root, preset=preset,
            agents=agents, protocol=protocol, shots=shots, seed=seed, lambda_vac=lambda_vac, lambda_lac=lambda_lac,
            lambda_rel=lambda_rel, lambda_mac=lambda_mac, temperature=temperature, mac_student=mac_student,
            router=router, views=views,
            layers=layers, epochs=epochs, prompt_depth=prompt_depth, device=device, precision=precision, workers=workers,
            eval_initial=eval_initial, resume=resume, force=force, stop_after_epoch=stop_after_epoch, pins=pins,
            report_to=report_to, progress=bars.enabled(), dataset_name=dataset_name)
        try:
            result = run_distill(options)
        except (CacheError, ValueError, FileNotFoundError, RuntimeError) as error:
            raise click.ClickException(str(error))
        results.append(result)
        click.echo(format_result(result))


def _parse_layers(value):
    if value in (None, "", "all"):
        return None
    try:
        return tuple(sorted({int(v) for v in value.split(",")}))
    except ValueError:
        raise click.BadParameter(f"expected 0-based layer indices like 3,7,11, got {value!r}", param_hint="--layers")


def format_result(result: dict) -> str:
    if result.get("status") == "stopped":
        return f"stopped after epoch {result['epoch']}: {result['run_dir']}"
    accuracy = result["accuracy"]
    parts = [f"{name} {value:.2f}" for name, value in accuracy.items()]
    line = f"{result['dataset']} {result['protocol']} {result['shots']}-shot seed {result['seed']}: " + \
        " | ".join(parts)
    if "initial_accuracy" in result:
        line += "   (epoch 0: " + " | ".join(f"{k} {v:.2f}" for k, v in result["initial_accuracy"].items()) + ")"
    return line + f"\n  {result['run_dir']}"


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", default=None, help="Evaluate on another dataset (cross-dataset / DG).")
@opt.data_root
@click.option("--device", default="auto", show_default=True)
def evaluate(run_dir, dataset, data_root, device):
    """Re-evaluate a trained run (its last checkpoint), e.g. on another dataset."""
    from pipelines.distillation import evaluate_run

    device = opt.check_device(_resolve_device(device))
    try:
        result = evaluate_run(run_dir, dataset, data_root, device, progress=bars.enabled())
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error))
    click.echo(f"{result['dataset']}: " + " | ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items()))

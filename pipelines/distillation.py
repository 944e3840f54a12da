"""One stage-2 run: resolve the protocol's data and the caches, train, evaluate, write the run directory.

    runs/<dataset>/<protocol>/shots<K>/seed<S>/<ablation>/
        config.json     the resolved configuration (+ the caches used, relative to the cache root)
        metrics.jsonl   one line per step: every loss term, lr, mean gate weight per agent
        checkpoint.pt   prompts + gates + optimiser + schedule + RNG (after every epoch)
        final.json      accuracies of the last epoch (no selection on test data)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.presets import resolve_agents, student_spec
from pipelines.protocols import EPOCHS, PROMPT_DEPTH, harmonic_mean, test_sets, training_set

ABLATION_FLAGS = ("agents", "lambda_vac", "lambda_lac", "lambda_rel", "lambda_mac", "temperature", "router", "views",
                  "layers", "epochs", "prompt_depth")


@dataclass
class DistillOptions:
    dataset: str = "eurosat"
    data_root: Path = Path("data")
    cache_root: Path = Path("cache")
    runs_root: Path = Path("runs")
    preset: str = "paper"
    agents: str = "all"
    protocol: str = "base2novel"
    shots: int = 16
    seed: int = 1
    lambda_vac: float = 1.0
    lambda_lac: float = 25.0
    lambda_rel: float = 1.0
    lambda_mac: float = 1.0
    temperature: float = 1.0
    router: str = "mlp"
    views: int | None = None
    layers: tuple[int, ...] | None = None   # student layers distilled by L_VAC (None = all)
    epochs: int | None = None          # None = the protocol's (20 base2novel, 50 fewshot)
    prompt_depth: int | None = None    # None = the protocol's (9; 3 for cross/dg)
    device: str = "cpu"
    precision: str = "auto"
    workers: int = 0
    eval_initial: bool = False
    resume: bool = False
    force: bool = False
    stop_after_epoch: int | None = None
    pins: dict = field(default_factory=dict)
    report_to: str = ""                # trackers, e.g. "tensorboard,wandb" (pipelines.tracking)
    progress: bool = True


def ablation_slug(options: DistillOptions) -> str:
    """'default', or a readable slug of the non-default ablation flags plus a short hash of them."""
    defaults = DistillOptions()
    changed = {name: getattr(options, name) for name in ABLATION_FLAGS
               if getattr(options, name) != getattr(defaults, name)}
    if not changed:
        return "default"
    readable = "_".join(f"{name.replace('lambda_', 'l')}-{_short(value)}" for name, value in changed.items())
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{readable[:60]}-{digest}"


def _short(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value).replace(",", "+").replace("/", "-").replace(" ", "")


def run_directory(options: DistillOptions) -> Path:
    return (Path(options.runs_root) / options.dataset / options.protocol / f"shots{options.shots}" /
            f"seed{options.seed}" / ablation_slug(options))


def extract_hint(options: DistillOptions, agent: str, views: int | None) -> str:
    protocol = "base2novel" if options.protocol == "base2novel" else "fewshot"
    return (f"transagent extract --dataset {options.dataset} --preset {options.preset} --agents {agent} "
            f"--protocol {protocol} --shots {options.shots} --seeds {options.seed}"
            + (f" --views {views}" if views else "") + f" --cache-root {options.cache_root}")


def distill(options: DistillOptions) -> dict:
    """Train (or resume, or return the finished result of) one run; returns final.json's content."""
    from pipelines.tracking import open_trackers

    directory = run_directory(options)
    trackers = open_trackers(options.report_to, directory, directory.relative_to(options.runs_root).as_posix())
    try:
        return _distill(options, trackers)
    finally:
        trackers.close()


def _distill(options: DistillOptions, trackers) -> dict:
    from cache_schema.pack import reading
    from distill.data import open_teachers
    from distill.trainer import RunConfig, Trainer, evaluate
    from pipelines.datasets import load_dataset

    dataset = load_dataset(options.dataset, options.data_root)
    chosen = training_set(dataset, options.protocol, options.shots, options.seed, options.data_root)
    agents = resolve_agents(options.agents)
    student = student_spec(options.preset)
    if options.preset == "tiny":
        from pipelines.presets import register_model_configs

        register_model_configs()
    directory = run_directory(options)
    final_path = directory / "final.json"
    if options.force and directory.exists():
        shutil.rmtree(directory)
    if final_path.exists() and not options.resume:
        return json.loads(final_path.read_text())
    if (directory / "checkpoint.pt").exists() and not options.resume:
        raise RuntimeError(f"{directory} holds a checkpoint of an unfinished run; pass --resume to continue it or "
                           "--force to start over")

    bank = open_teachers(options.cache_root, options.dataset, dataset.split_hash, agents, chosen.classnames,
                         chosen.class_set, options.pins,
                         hint=extract_hint(options, "<agent>", options.views).replace("<agent>", ",".join(agents)))
    bank.check_rows(chosen.keys, options.views or bank.available_views() or 1,
                    hint=extract_hint(options, ",".join(bank.vision or bank.multimodal), options.views))
    config = RunConfig(
        dataset=options.dataset, protocol=options.protocol, shots=options.shots, seed=options.seed, agents=agents,
        lambda_vac=options.lambda_vac, lambda_lac=options.lambda_lac, lambda_rel=options.lambda_rel,
        lambda_mac=options.lambda_mac, temperature=options.temperature, router=options.router, views=options.views,
        layers=list(options.layers) if options.layers is not None else None,
        epochs=options.epochs if options.epochs is not None else EPOCHS[options.protocol],
        prompt_depth=(options.prompt_depth if options.prompt_depth is not None
                      else min(PROMPT_DEPTH[options.protocol], student.layers)),
        student_model=student.model, student_pretrained=student.pretrained, precision=options.precision,
        device=options.device, workers=options.workers)
    directory.mkdir(parents=True, exist_ok=True)
    resolved = {"run": asdict(config), "preset": options.preset, "split_hash": dataset.split_hash,
                "train_keys": len(chosen.keys), "classnames": chosen.classnames,
                "caches": {name: Path(os.path.relpath(path, options.cache_root)).as_posix()
                           for name, path in bank.paths.items()}}
    _check_resumed_config(directory / "config.json", resolved, options.resume)
    (directory / "config.json").write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
    trackers.config(resolved)

    with contextlib.ExitStack() as leases:  # `cache gc` leaves caches alone while a run reads them
        for path in bank.paths.values():
            leases.enter_context(reading(path))
        trainer = Trainer(config, chosen.keys, chosen.labels, chosen.classnames, dataset.image_root, bank, directory,
                          progress=options.progress)
        if options.resume and (directory / "checkpoint.pt").exists():
            trainer.load_checkpoint(directory / "checkpoint.pt")
        initial = None
        if options.eval_initial and trainer.epoch == 0:
            initial = _evaluate_all(trainer.student, dataset, options, evaluate)
        start = time.perf_counter()
        trainer.fit(stop_after_epoch=options.stop_after_epoch, on_epoch=trackers.epoch)
        if not (directory / "checkpoint.pt").exists():  # zero epochs: keep the (initial) prompts for `evaluate`
            trainer.save_checkpoint()
    if trainer.epoch < config.epochs:
        return {"status": "stopped", "epoch": trainer.epoch, "run_dir": str(directory)}
    accuracy = _evaluate_all(trainer.student, dataset, options, evaluate)
    trackers.accuracy(accuracy)
    final = {"dataset": options.dataset, "protocol": options.protocol, "shots": options.shots, "seed": options.seed,
             "ablation": directory.name, "agents": agents, "epochs": config.epochs, "accuracy": accuracy,
             "train_seconds": round(time.perf_counter() - start, 3), "run_dir": str(directory)}
    if initial is not None:
        final["initial_accuracy"] = initial
    final_path.write_text(json.dumps(final, indent=1, sort_keys=True) + "\n")
    return final


def _evaluate_all(student, dataset, options, evaluate) -> dict:
    accuracy = {}
    for name, (samples, classnames) in test_sets(dataset, options.protocol).items():
        accuracy[name] = round(evaluate(student, samples, classnames, dataset.image_root, device=options.device,
                                        progress=options.progress), 4)
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    return accuracy


def _check_resumed_config(path: Path, resolved: dict, resume: bool) -> None:
    if not (resume and path.exists()):
        return
    from cache_schema import differing_fields

    previous = json.loads(path.read_text())
    ignore = {"device", "workers"}
    old = {k: v for k, v in previous["run"].items() if k not in ignore}
    new = {k: v for k, v in resolved["run"].items() if k not in ignore}
    diff = differing_fields(old, new)
    if diff:
        raise ValueError(f"cannot resume {path.parent}: the configuration changed in {', '.join(diff)}")


def evaluate_run(run_dir, dataset_name: str | None, data_root, device: str = "cpu", progress: bool = True) -> dict:
    """Re-evaluate a trained run's prompts (e.g. on another dataset for cross/dg); writes eval-<dataset>.json."""
    import torch

    from distill.student import build_student
    from distill.trainer import evaluate
    from pipelines.datasets import load_dataset, subsample_classes

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    run = config["run"]
    if config["preset"] == "tiny":
        from pipelines.presets import register_model_configs

        register_model_configs()
    state = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=False)
    name = dataset_name or run["dataset"]
    dataset = load_dataset(name, data_root)
    student = build_student(run["student_model"], run["student_pretrained"], run["prompt_depth"], run["n_ctx"],
                            run["ctx_init"], None, device, run["template"])
    student.load_prompt_state_dict(state["prompts"])
    if name == run["dataset"]:
        sets = test_sets(dataset, run["protocol"])
    else:
        sets = {"all": subsample_classes(dataset.test, dataset.classnames, "all")}
    accuracy = {which: round(evaluate(student, samples, classnames, dataset.image_root, device=device,
                                      progress=progress), 4) for which, (samples, classnames) in sets.items()}
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    result = {"run_dir": str(run_dir), "dataset": name, "accuracy": accuracy}
    (run_dir / f"eval-{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


__all__ = ["DistillOptions", "ablation_slug", "distill", "evaluate_run", "run_directory"]

"""One stage-2 run: resolve the protocol's data and the caches, train, evaluate, write the run directory.

    runs/<dataset>/<protocol>/shots<K>/seed<S>/<ablation>/     <dataset>: the dataset's slug (`dataset_slug`)
        config.json             the resolved configuration (+ the caches used, relative to the cache root)
        metrics.jsonl           one line per step: every loss term, lr, mean gate weight per agent
        checkpoint.safetensors  prompts + gates + optimiser + schedule + RNG (after every epoch; no pickle)
        final.json              accuracies of the last epoch (no selection on test data)

A finished run is reused, and an unfinished one resumed, only when its resolved configuration is this one's.
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

from cache_schema.manifest import Manifest
from pipelines.presets import resolve_agents, student_spec
from pipelines.protocols import EPOCHS, PROMPT_DEPTH, harmonic_mean, test_sets, training_set

ABLATION_FLAGS = ("agents", "lambda_vac", "lambda_lac", "lambda_rel", "lambda_mac", "temperature", "mac_student",
                  "router", "views", "layers", "epochs", "prompt_depth")


@dataclass
class DistillOptions:
    dataset: str = "eurosat"
    dataset_name: str | None = None    # --dataset-name: directory name of a folder dataset (default: its slug)
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
    mac_student: str = "standardized"        # L_MAC's student scores: "standardized" or raw "logits"
    router: str = "mlp"
    views: int | None = None
    layers: tuple[int, ...] | None = None   # agent layers distilled by L_VAC (None = every stored one)
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
    from pipelines.datasets import dataset_slug

    return (Path(options.runs_root) / dataset_slug(options.dataset, options.dataset_name) / options.protocol /
            f"shots{options.shots}" / f"seed{options.seed}" / ablation_slug(options))


def extract_hint(options: DistillOptions, agent: str, views: int | None) -> str:
    protocol = "base2novel" if options.protocol == "base2novel" else "fewshot"
    name = f" --dataset-name {options.dataset_name}" if options.dataset_name else ""
    return (f"transagent extract --dataset {options.dataset}{name} --preset {options.preset} --agents {agent} "
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
    from cache_schema.leases import reading
    from distill import checkpoints
    from distill.data import open_teachers
    from distill.trainer import RunConfig, Trainer, evaluate
    from pipelines.datasets import dataset_slug, fewshot_path, load_dataset

    dataset = load_dataset(options.dataset, options.data_root)
    slug = dataset_slug(options.dataset, options.dataset_name)
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
    if checkpoints.find(directory) and not final_path.exists() and not options.resume:
        raise RuntimeError(f"{directory} holds a checkpoint of an unfinished run; pass --resume to continue it or "
                           "--force to start over")

    bank = open_teachers(options.cache_root, slug, dataset.split_hash, agents, chosen.classnames,
                         chosen.class_set, options.pins,
                         hint=extract_hint(options, "<agent>", options.views).replace("<agent>", ",".join(agents)),
                         dataset_fields=dataset.fingerprint_fields(slug), depth_fallback=agent_spec_depth)
    selection = fewshot_path(dataset, options.shots, options.seed)
    layer_pairs = bank.layer_pairs(student.layers, options.layers)
    bank.check_rows(chosen.keys, options.views or bank.available_views() or 1,
                    hint=extract_hint(options, ",".join(bank.vision or bank.multimodal), options.views),
                    skipped_hint=f"repair them and re-run the extraction, or leave them out of this run: delete "
                                 f"their keys from the \"train\" list of {selection} (their classes then train on "
                                 "fewer shots)")
    config = RunConfig(
        dataset=slug, protocol=options.protocol, shots=options.shots, seed=options.seed, agents=agents,
        lambda_vac=options.lambda_vac, lambda_lac=options.lambda_lac, lambda_rel=options.lambda_rel,
        lambda_mac=options.lambda_mac, temperature=options.temperature, mac_student=options.mac_student,
        router=options.router, views=options.views,
        layers=list(options.layers) if options.layers is not None else None,
        epochs=options.epochs if options.epochs is not None else EPOCHS[options.protocol],
        prompt_depth=(options.prompt_depth if options.prompt_depth is not None
                      else min(PROMPT_DEPTH[options.protocol], student.layers)),
        student_model=student.model, student_pretrained=student.pretrained, precision=options.precision,
        device=options.device, workers=options.workers)
    resolved = {"run": asdict(config), "preset": options.preset, "split_hash": dataset.split_hash,
                "dataset": dataset.fingerprint_fields(slug), "dataset_spec": options.dataset,
                "train_keys": len(chosen.keys),
                "train_keys_sha256": hashlib.sha256(json.dumps(chosen.keys).encode()).hexdigest(),
                "classnames": chosen.classnames,
                "vision_layers": [{"agent": p.agent, "student": p.student} for p in layer_pairs],
                "caches": {name: Path(os.path.relpath(path, options.cache_root)).as_posix()
                           for name, path in bank.paths.items()}}
    if final_path.exists() and not options.resume:
        _check_same_run(directory, resolved, "reuse")
        return json.loads(final_path.read_text())
    check_run_images(dataset, chosen.keys, options.protocol, selection)
    directory.mkdir(parents=True, exist_ok=True)
    if options.resume:
        _check_same_run(directory, resolved, "resume")
    (directory / "config.json").write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
    trackers.config(resolved)

    with contextlib.ExitStack() as leases:  # `cache gc` leaves caches alone while a run reads them
        for path in bank.paths.values():
            leases.enter_context(reading(path))
        trainer = Trainer(config, chosen.keys, chosen.labels, chosen.classnames, dataset.image_root, bank, directory,
                          progress=options.progress)
        checkpoint = checkpoints.find(directory)
        if options.resume and checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        initial = None
        if options.eval_initial and trainer.epoch == 0:
            initial = _evaluate_all(trainer.student, dataset, options, evaluate)
        start = time.perf_counter()
        trainer.fit(stop_after_epoch=options.stop_after_epoch, on_epoch=trackers.epoch)
        if checkpoints.find(directory) is None:  # zero epochs: keep the (initial) prompts for `evaluate`
            trainer.save_checkpoint()
    if trainer.epoch < config.epochs:
        return {"status": "stopped", "epoch": trainer.epoch, "run_dir": str(directory)}
    accuracy = _evaluate_all(trainer.student, dataset, options, evaluate)
    trackers.accuracy(accuracy)
    final = {"dataset": slug, "protocol": options.protocol, "shots": options.shots, "seed": options.seed,
             "ablation": directory.name, "agents": agents, "epochs": config.epochs, "accuracy": accuracy,
             "train_seconds": round(time.perf_counter() - start, 3), "run_dir": str(directory)}
    if initial is not None:
        final["initial_accuracy"] = initial
    final_path.write_text(json.dumps(final, indent=1, sort_keys=True) + "\n")
    return final


MAX_LISTED = 10  # unreadable images named in an error


def check_run_images(dataset, train_keys, protocol: str, selection: Path) -> None:
    """Every image a run reads must open before training starts: training images are decoded in full (they are
    read every epoch), test images by their header (decoding a whole test set up front costs as much as testing)."""
    from pipelines.datasets import DatasetError, unreadable_images

    test_keys = sorted({sample.key for samples, _ in test_sets(dataset, protocol).values() for sample in samples})
    problems = {**unreadable_images(dataset.image_root, train_keys, decode=True),
                **unreadable_images(dataset.image_root, test_keys, decode=False)}
    if problems:
        listed = "\n".join(f"  {path}: {reason}" for path, reason in list(problems.items())[:MAX_LISTED])
        train = set(str(dataset.image_root / key) for key in train_keys)
        advice = "repair or replace them"
        if train & set(problems):
            advice += (f"; a training image can also be left out by deleting its key from the \"train\" list of "
                       f"{selection}")
        raise DatasetError(f"{len(problems)} image(s) of {dataset.name} cannot be read, nothing was trained "
                           f"({advice}); the first {min(len(problems), MAX_LISTED)}:\n{listed}")


def agent_spec_depth(agent: str, manifest: Manifest) -> int | None:
    """The block count of a vision cache's agent, for caches made before stage 1 recorded it: the tiny config the
    manifest records, else the agent registry's depth for the real model (the registry is imported only here)."""
    tiny_config = manifest.tiny_config
    if isinstance(tiny_config, dict) and "num_hidden_layers" in tiny_config:
        return tiny_config["num_hidden_layers"]
    from extract.agents import get_agent

    try:
        return get_agent(agent).depth
    except KeyError:
        return None


def _evaluate_all(student, dataset, options, evaluate) -> dict:
    accuracy = {}
    for name, (samples, classnames) in test_sets(dataset, options.protocol).items():
        accuracy[name] = round(evaluate(student, samples, classnames, dataset.image_root, device=options.device,
                                        progress=options.progress), 4)
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    return accuracy


# Settings that do not change the numbers of a run (a resumed run may use another device or worker count) or
# that say where the dataset is rather than what it is.
NOT_COMPARED = {"device", "workers", "dataset_spec"}


def _check_same_run(directory: Path, resolved: dict, action: str) -> None:
    """A run directory is reused or resumed only for the configuration it was made with."""
    from cache_schema import differing_fields

    path = directory / "config.json"
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ValueError(f"{path} is unreadable ({error}); pass --force to start the run over") from None

    def compared(config):
        run = config.get("run")
        return {**{k: v for k, v in config.items() if k not in NOT_COMPARED},
                "run": {k: v for k, v in run.items() if k not in NOT_COMPARED} if isinstance(run, dict) else run}

    diff = differing_fields(compared(previous), compared(resolved))
    if diff:
        what = "finished run" if action == "reuse" else "run"
        raise ValueError(
            f"cannot {action} {directory}: that {what} was made with another configuration (differs in "
            f"{', '.join(diff[:8])}); if it is another dataset of the same name, name this one with --dataset-name, "
            "otherwise pass --force to start over")


def evaluate_run(run_dir, dataset_name: str | None, data_root, device: str = "cpu", progress: bool = True) -> dict:
    """Re-evaluate a trained run's prompts (e.g. on another dataset for cross/dg); writes eval-<dataset>.json.

    The checkpoint is parsed, never unpickled (`distill.checkpoints`): a run directory may come from anyone."""
    from distill import checkpoints
    from distill.student import build_student
    from distill.trainer import evaluate
    from pipelines.datasets import dataset_slug, load_dataset, subsample_classes

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
        run = config["run"]
        fields = {key: run[key] for key in ("dataset", "protocol", "student_model", "student_pretrained",
                                            "prompt_depth", "n_ctx", "ctx_init", "template")}
        preset = config["preset"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path} not found; RUN_DIR is a run directory written by `transagent "
                                "distill`") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{config_path}: not a run configuration ({type(error).__name__}: {error})") from None
    # The run's own dataset: as it was given to distill (runs from before `dataset_spec` stored the name itself)
    name = dataset_name or config.get("dataset_spec") or fields["dataset"]
    dataset = load_dataset(name, data_root)
    slug = fields["dataset"] if dataset_name is None else dataset_slug(dataset_name)
    checkpoint = checkpoints.find(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint ({checkpoints.FILE})")
    state = checkpoints.load(checkpoint)
    if preset == "tiny":
        from pipelines.presets import register_model_configs

        register_model_configs()
    student = build_student(fields["student_model"], fields["student_pretrained"], fields["prompt_depth"],
                            fields["n_ctx"], fields["ctx_init"], None, device, fields["template"])
    student.load_prompt_state_dict(state["prompts"])
    if slug == fields["dataset"]:
        sets = test_sets(dataset, fields["protocol"])
    else:
        sets = {"all": subsample_classes(dataset.test, dataset.classnames, "all")}
    accuracy = {which: round(evaluate(student, samples, classnames, dataset.image_root, device=device,
                                      progress=progress), 4) for which, (samples, classnames) in sets.items()}
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    result = {"run_dir": str(run_dir), "dataset": slug, "accuracy": accuracy}
    (run_dir / f"eval-{slug}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


__all__ = ["DistillOptions", "ablation_slug", "distill", "evaluate_run", "run_directory"]

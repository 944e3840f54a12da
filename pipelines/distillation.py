"""One stage-2 run: resolve the protocol's data and the caches, train, evaluate, write the run directory.

    runs/<dataset>/<protocol>/shots<K>/seed<S>/<readable>-<hash>/   (`pipelines.config.distill.run_name`)
        config.yaml             the run's configuration, every setting resolved: `distill --config` re-runs it
        config.json             what it resolved to here (+ the caches used, relative to the cache root)
        metrics.jsonl           one line per step: every loss term, lr, mean gate weight per agent
        checkpoint.safetensors  prompts + gates + optimiser + schedule + RNG (after every epoch; no pickle)
        final.json              accuracies of the last epoch (no selection on test data)

A finished run is reused, and an unfinished one resumed, only when its resolved configuration is this one's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from cache_schema import differing_fields
from cache_schema.leases import reading
from cache_schema.manifest import Manifest
from distill import checkpoints
from distill.config import DistillConfig, PromptConfig, StudentConfig
from distill.data import open_teachers
from pipelines.config.distill import DistillRun, as_yaml, is_run_name, run_name
from pipelines.config.files import write_config
from pipelines.config.tree import ConfigError, build, from_mapping
from pipelines.datasets import (DatasetError, dataset_slug, fewshot_path, load_dataset, subsample_classes,
                                unreadable_images)
from pipelines.devices import resolve_device
from pipelines.presets import register_model_configs, resolve_agents, student_blocks
from pipelines.protocols import harmonic_mean, test_sets, training_set
from pipelines.tracking import open_trackers

log = logging.getLogger(__name__)
CONFIG_YAML = "config.yaml"


def run_directory(config: DistillRun) -> Path:
    return (Path(config.runs_root) / dataset_slug(config.dataset, config.dataset_name) / config.protocol /
            f"shots{config.shot}" / f"seed{config.seed}" / run_name(config))


def extract_hint(config: DistillRun, agent: str, views: int | None) -> str:
    protocol = "base2novel" if config.protocol == "base2novel" else "fewshot"
    name = f" --dataset-name {config.dataset_name}" if config.dataset_name else ""
    return (f"transagent extract --dataset {config.dataset}{name} --preset {config.preset} --agents {agent} "
            f"--protocol {protocol} --shots {config.shot} --seeds {config.seed}"
            + (f" --views {views}" if views else "") + f" --cache-root {config.cache_root}")


def distill(config: DistillRun, *, resume: bool = False, force: bool = False, stop_after_epoch: int | None = None,
            progress: bool = True) -> dict:
    """Train (or resume, or return the finished result of) one run; returns final.json's content."""
    directory = run_directory(config)
    _note_earlier_runs(directory)
    trackers = open_trackers(config.report_to, directory,
                             directory.relative_to(config.runs_root).as_posix())
    try:
        return _distill(config, trackers, resume, force, stop_after_epoch, progress)
    finally:
        trackers.close()


def _note_earlier_runs(directory: Path) -> None:
    """Run directories named by an earlier version (no configuration hash) are never reused: say so once."""
    if directory.exists() or not directory.parent.is_dir():
        return
    earlier = sorted(path.name for path in directory.parent.iterdir() if path.is_dir() and not is_run_name(path.name))
    if earlier:
        log.warning("note: %s holds run directories of an earlier version (%s); they are not reused, this run "
                    "trains in %s (README, Stage 2: run directories)", directory.parent, ", ".join(earlier[:3]),
                    directory.name)


def run_config(config: DistillRun, dataset: str, agents: list[str], device: str):
    """What the trainer reads: the method's settings as they are, and the run's data."""
    from distill.trainer import RunConfig   # torch: not for a run that is only read back

    method = {item.name: getattr(config, item.name) for item in dataclasses.fields(DistillConfig)}
    return RunConfig(**method, dataset=dataset, protocol=config.protocol, shots=config.shot, seed=config.seed,
                     agents=tuple(agents), views=config.views, layers=config.layers, device=device,
                     workers=config.workers)


def _distill(config: DistillRun, trackers, resume: bool, force: bool, stop_after_epoch, progress: bool) -> dict:
    from distill.trainer import Trainer, evaluate

    dataset = load_dataset(config.dataset, config.data_root)
    slug = dataset_slug(config.dataset, config.dataset_name)
    chosen = training_set(dataset, config.protocol, config.shot, config.seed, config.data_root)
    agents = resolve_agents(config.agents)
    if config.preset == "tiny":
        register_model_configs()
    directory = run_directory(config)
    final_path = directory / "final.json"
    if force and directory.exists():
        shutil.rmtree(directory)
    if checkpoints.find(directory) and not final_path.exists() and not resume:
        raise RuntimeError(f"{directory} holds a checkpoint of an unfinished run; pass --resume to continue it or "
                           "--force to start over")

    bank = open_teachers(config.cache_root, slug, dataset.split_hash, agents, chosen.classnames,
                         chosen.class_set, config.pins,
                         hint=extract_hint(config, "<agent>", config.views).replace("<agent>", ",".join(agents)),
                         dataset_fields=dataset.fingerprint_fields(slug), depth_fallback=agent_spec_depth)
    selection = fewshot_path(dataset, config.shot, config.seed)
    layer_pairs = bank.layer_pairs(student_blocks(config.student.model), config.layers)
    bank.check_rows(chosen.keys, config.views or bank.available_views() or 1,
                    hint=extract_hint(config, ",".join(bank.vision or bank.multimodal), config.views),
                    skipped_hint=f"repair them and re-run the extraction, or leave them out of this run: delete "
                                 f"their keys from the \"train\" list of {selection} (their classes then train on "
                                 "fewer shots)")
    device = resolve_device(config.device)
    trained = run_config(config, slug, agents, device)
    resolved = {"run": dataclasses.asdict(trained), "preset": config.preset, "split_hash": dataset.split_hash,
                "dataset": dataset.fingerprint_fields(slug), "dataset_spec": config.dataset,
                "train_keys": len(chosen.keys),
                "train_keys_sha256": hashlib.sha256(json.dumps(chosen.keys).encode()).hexdigest(),
                "classnames": chosen.classnames,
                "vision_layers": [{"agent": p.agent, "student": p.student} for p in layer_pairs],
                "caches": {name: Path(os.path.relpath(path, config.cache_root)).as_posix()
                           for name, path in bank.paths.items()}}
    if final_path.exists() and not resume:
        _check_same_run(directory, resolved, "reuse")
        return json.loads(final_path.read_text())
    check_run_images(dataset, chosen.keys, config.protocol, selection)
    directory.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_same_run(directory, resolved, "resume")
    (directory / "config.json").write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")
    write_config(directory / CONFIG_YAML, as_yaml(config),
                 f"transagent distill --config {CONFIG_YAML} re-runs this run into the same directory {directory.name}")
    trackers.config(resolved)

    with contextlib.ExitStack() as leases:  # `cache gc` leaves caches alone while a run reads them
        for path in bank.paths.values():
            leases.enter_context(reading(path))
        trainer = Trainer(trained, chosen.keys, chosen.labels, chosen.classnames, dataset.image_root, bank, directory,
                          progress=progress)
        checkpoint = checkpoints.find(directory)
        if resume and checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        initial = None
        if config.eval_initial and trainer.epoch == 0:
            initial = _evaluate_all(trainer.student, dataset, config.protocol, device, progress, evaluate)
        start = time.perf_counter()
        trainer.fit(stop_after_epoch=stop_after_epoch, on_epoch=trackers.epoch)
        if checkpoints.find(directory) is None:  # zero epochs: keep the (initial) prompts for `evaluate`
            trainer.save_checkpoint()
    if trainer.epoch < config.optim.epochs:
        return {"status": "stopped", "epoch": trainer.epoch, "run_dir": str(directory)}
    accuracy = _evaluate_all(trainer.student, dataset, config.protocol, device, progress, evaluate)
    trackers.accuracy(accuracy)
    final = {"dataset": slug, "protocol": config.protocol, "shots": config.shot, "seed": config.seed,
             "ablation": directory.name, "agents": agents, "epochs": config.optim.epochs, "accuracy": accuracy,
             "train_seconds": round(time.perf_counter() - start, 3), "run_dir": str(directory)}
    if initial is not None:
        final["initial_accuracy"] = initial
    final_path.write_text(json.dumps(final, indent=1, sort_keys=True) + "\n")
    return final


MAX_LISTED = 10  # unreadable images named in an error


def check_run_images(dataset, train_keys, protocol: str, selection: Path) -> None:
    """Every image a run reads must open before training starts: training images are decoded in full (they are
    read every epoch), test images by their header (decoding a whole test set up front costs as much as testing)."""
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
    from extract.agents import get_agent   # stage 1's registry, only for caches this old

    try:
        return get_agent(agent).depth
    except KeyError:
        return None


def _evaluate_all(student, dataset, protocol: str, device: str, progress: bool, evaluate) -> dict:
    accuracy = {}
    for name, (samples, classnames) in test_sets(dataset, protocol).items():
        accuracy[name] = round(evaluate(student, samples, classnames, dataset.image_root, device=device,
                                        progress=progress), 4)
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    return accuracy


# Settings that do not change the numbers of a run (a resumed run may use another device or worker count) or
# that say where the dataset is rather than what it is.
NOT_COMPARED = {"device", "workers", "dataset_spec"}


def _check_same_run(directory: Path, resolved: dict, action: str) -> None:
    """A run directory is reused or resumed only for the configuration it was made with."""
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
    from distill.student import build_student
    from distill.trainer import evaluate

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
        run = config["run"]
        trained_on, protocol, preset = run["dataset"], run["protocol"], config["preset"]
        student, prompts = _student_and_prompts(run)
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path} not found; RUN_DIR is a run directory written by `transagent "
                                "distill`") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{config_path}: not a run configuration ({type(error).__name__}: {error})") from None
    # The run's own dataset: as it was given to distill (runs from before `dataset_spec` stored the name itself)
    name = dataset_name or config.get("dataset_spec") or trained_on
    dataset = load_dataset(name, data_root)
    slug = trained_on if dataset_name is None else dataset_slug(dataset_name)
    checkpoint = checkpoints.find(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint ({checkpoints.FILE})")
    state = checkpoints.load(checkpoint)
    if preset == "tiny":
        register_model_configs()
    model = build_student(student.model, student.pretrained, prompts, None, device)
    model.load_prompt_state_dict(state["prompts"])
    if slug == trained_on:
        sets = test_sets(dataset, protocol)
    else:
        sets = {"all": subsample_classes(dataset.test, dataset.classnames, "all")}
    accuracy = {which: round(evaluate(model, samples, classnames, dataset.image_root, device=device,
                                      progress=progress), 4) for which, (samples, classnames) in sets.items()}
    if "base" in accuracy and "novel" in accuracy:
        accuracy["hm"] = round(harmonic_mean(accuracy["base"], accuracy["novel"]), 4)
    result = {"run_dir": str(run_dir), "dataset": slug, "accuracy": accuracy}
    (run_dir / f"eval-{slug}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def _student_and_prompts(run: dict) -> tuple[StudentConfig, PromptConfig]:
    """The student and prompt settings of config.json's run, checked (ConfigError is a ValueError); runs made
    before the prompts were set per tower stored one depth and one token count for both."""
    if "prompts" not in run:
        run = {"student": {"model": run["student_model"], "pretrained": run["student_pretrained"]},
               "prompts": {"depth_vision": run["prompt_depth"], "depth_text": run["prompt_depth"],
                           "n_ctx_vision": run["n_ctx"], "n_ctx_text": run["n_ctx"], "ctx_init": run["ctx_init"],
                           "template": run["template"]}}
    try:
        values = from_mapping(DistillConfig, {"student": run["student"], "prompts": run["prompts"]})
    except ConfigError as error:
        raise ValueError(str(error)) from None
    config = build(DistillConfig, values)
    return config.student, config.prompts


__all__ = ["distill", "evaluate_run", "run_config", "run_directory"]

"""Protocols: which images and classes each stage sees. One place, shared by `extract` and `distill`.

base2novel: train on the few-shot images of the base classes (first ceil(C/2) labels), test base and novel.
fewshot:    train on K shots of all classes, test all classes.
cross:      train like fewshot on a source dataset (ImageNet), test on other datasets (`evaluate`).
dg:         the cross-trained prompts tested on ImageNet variants (`evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("base2novel", "fewshot", "cross", "dg")   # each one's settings: pipelines/configs/<protocol>.yaml
ALIASES = {"base2new": "base2novel"}                   # the CoOp family's name


@dataclass(frozen=True)
class TrainingSet:
    keys: list[str]            # few-shot training keys (sorted)
    labels: list[int]          # labels within `classnames`
    classnames: list[str]      # the training class set, in label order
    class_set: str             # "base" or "all"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return protocol


def training_class_set(protocol: str) -> str:
    return "base" if check_protocol(protocol) == "base2novel" else "all"


def training_set(dataset, protocol: str, shots: int, seed: int, data_root) -> TrainingSet:
    """The few-shot training images of a protocol, relabelled to its class set."""
    from pipelines.datasets import fewshot_keys, subsample_classes

    class_set = training_class_set(protocol)
    chosen = set(fewshot_keys(dataset, shots, seed, data_root))
    samples = [sample for sample in dataset.train if sample.key in chosen]
    samples, classnames = subsample_classes(samples, dataset.classnames, class_set)
    samples = sorted(samples, key=lambda sample: sample.key)
    return TrainingSet([s.key for s in samples], [s.label for s in samples], classnames, class_set)


def test_sets(dataset, protocol: str) -> dict[str, tuple[list, list[str]]]:
    """name -> (samples relabelled to the class set, classnames) for evaluation."""
    from pipelines.datasets import subsample_classes

    if check_protocol(protocol) == "base2novel":
        return {which: subsample_classes(dataset.test, dataset.classnames, which) for which in ("base", "novel")}
    return {"all": subsample_classes(dataset.test, dataset.classnames, "all")}


def harmonic_mean(base: float, novel: float) -> float:
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0

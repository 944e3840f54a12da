"""Few-shot selections as data, and the base/novel class split.

`<dataset dir>/fewshot/shot_{K}-seed_{S}.json` holds the chosen keys and the hash of the split file they were
drawn from. It is written once and then only read, by both stages, so the selection never depends on RNG state.
The draw reproduces Dassl's `generate_fewshot_dataset` as CoOp calls it right after `set_random_seed(S)`:
classes in order of first appearance in the split list (label order for label-grouped splits),
`random.sample(items, K)` per class for train, then `min(K, 4)` per class for val from the same generator.
Unlike Dassl, a class with fewer than K training images is an error instead of silently contributing fewer.
"""
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from pipelines.datasets.dataset import Dataset, Sample, load_dataset
from pipelines.datasets.errors import DatasetError
from pipelines.datasets.splitfile import write_atomic

MAX_VAL_SHOTS = 4
CLASS_SETS = ("base", "novel", "all")


@dataclass(frozen=True)
class FewShot:
    shots: int
    seed: int
    split_hash: str
    train: list[str]   # keys into Dataset.train
    val: list[str]     # keys into Dataset.val
    path: Path


def fewshot_path(dataset: Dataset, shots: int, seed: int) -> Path:
    return dataset.root / "fewshot" / f"shot_{shots}-seed_{seed}.json"


def draw_fewshot(dataset: Dataset, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """Pure draw (no file): (train keys, val keys)."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    if not dataset.train:
        raise DatasetError(f"{dataset.name} has no training split (it is test-only); few-shot needs one")
    train_by_class = _by_class(dataset.train)
    absent = [dataset.classnames[label] for label in range(dataset.num_classes) if label not in train_by_class]
    if absent:
        raise DatasetError(f"{dataset.name}: class(es) {absent[:5]} have no training images")
    short = [(samples[0].classname, len(samples)) for samples in train_by_class.values() if len(samples) < shots]
    if short:
        listed = ", ".join(f"{name!r} has {count}" for name, count in short[:5])
        raise DatasetError(f"{dataset.name}: {shots} shots requested but {len(short)} class(es) have fewer training "
                           f"images: {listed}")
    rng = random.Random(seed)
    train = [s.key for samples in train_by_class.values() for s in rng.sample(samples, shots)]
    val_shots = min(shots, MAX_VAL_SHOTS)
    val = [s.key for samples in _by_class(dataset.val).values()   # Dassl keeps a short class whole, unshuffled
           for s in (rng.sample(samples, val_shots) if len(samples) >= val_shots else samples)]
    return train, val


def _by_class(samples: list[Sample]) -> dict[int, list[Sample]]:
    groups = {}
    for sample in samples:
        groups.setdefault(sample.label, []).append(sample)
    return groups


def fewshot_selection(dataset: Dataset, shots: int, seed: int) -> FewShot:
    """Read the selection file, or draw and write it once. A file from another split file is an error."""
    path = fewshot_path(dataset, shots, seed)
    if path.exists():
        return _read(path, dataset, shots, seed)
    train, val = draw_fewshot(dataset, shots, seed)
    record = {"shots": shots, "seed": seed, "split_hash": dataset.split_hash, "train": train, "val": val}
    write_atomic(path, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return FewShot(shots, seed, dataset.split_hash, train, val, path)


def _read(path: Path, dataset: Dataset, shots: int, seed: int) -> FewShot:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        train, val, split_hash = list(record["train"]), list(record["val"]), record["split_hash"]
        stored = (record["shots"], record["seed"])
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: not a few-shot selection file ({error!r}); delete it to draw again") from None
    if stored != (shots, seed):
        raise DatasetError(f"{path}: holds shots={stored[0]}, seed={stored[1]}, not shots={shots}, seed={seed}")
    if split_hash != dataset.split_hash:
        raise DatasetError(
            f"{path} was drawn from split file sha256 {split_hash[:12]}..., but {dataset.split_path.name} is now "
            f"{dataset.split_hash[:12]}...; the split changed. Restore it, or delete {path.name} to draw a new "
            f"selection (caches and runs made with the old one will not match it).")
    dataset.select(train, "train"), dataset.select(val, "val")   # every key must still be in its split
    return FewShot(shots, seed, split_hash, train, val, path)


def fewshot_keys(dataset: Dataset | str, shots: int, seed: int, data_root=None) -> list[str]:
    """The training keys of a K-shot selection (written once to `<dataset dir>/fewshot/`)."""
    if not isinstance(dataset, Dataset):
        if data_root is None:
            raise ValueError("data_root is needed when the dataset is given by name")
        dataset = load_dataset(dataset, data_root)
    return fewshot_selection(dataset, shots, seed).train


def subsample_classes(samples: list[Sample], classnames: list[str], which: str = "all"):
    """Keep the base (first ceil(C/2) labels), novel (the rest) or all classes; relabel from 0.

    Returns (samples, classnames) for the chosen class set, like CoOp's `OxfordPets.subsample_classes`.
    """
    if which not in CLASS_SETS:
        raise ValueError(f"unknown class set {which!r}; known: {', '.join(CLASS_SETS)}")
    if which == "all":
        return list(samples), list(classnames)
    base = math.ceil(len(classnames) / 2)
    kept = range(base) if which == "base" else range(base, len(classnames))
    relabel = {label: new for new, label in enumerate(kept)}
    out = [Sample(s.key, relabel[s.label], s.classname) for s in samples if s.label in relabel]
    return out, [classnames[label] for label in kept]

"""A dataset = its split file read into samples, with class names fixed and the image layout verified.

Sample keys are image paths exactly as written in the split file (POSIX, relative to `image_root`): caches and
few-shot files store keys, never absolute paths, so they survive a moved data root.
"""
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from pipelines.datasets.errors import DatasetError
from pipelines.datasets.folder import make_folder_split
from pipelines.datasets.images import missing_images
from pipelines.datasets.registry import DatasetInfo, dataset_slug, get_info, instructions
from pipelines.datasets.splitfile import SPLITS, read_split
from pipelines.datasets.synthetic import make_synthetic

MAX_LISTED = 10  # missing files named in an error message


class Sample(NamedTuple):
    key: str        # relative POSIX path under Dataset.image_root, as written in the split file
    label: int
    classname: str  # fixed name (CoOp renames applied, "_" -> " ")


@dataclass(eq=False)
class Dataset:
    name: str
    root: Path                 # dataset directory; few-shot files live in root / "fewshot"
    image_root: Path
    split_path: Path
    split_hash: str            # sha256 of the split file bytes
    classnames: list[str]      # index = label
    template: str              # CoOp prompt template, e.g. "a centered satellite photo of {}."
    transagent_template: str   # the official TransAgent DS_TEMPLATE (reference section 3.7)
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    info: DatasetInfo

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def slug(self) -> str:
        """File-system-safe name for cache and run directories (`folder:<dir>` -> `folder-<dir name>`)."""
        return dataset_slug(self.name)

    def fingerprint_fields(self, slug: str | None = None) -> dict:
        """What identifies this dataset in cache fingerprints: its name and split hash; a folder dataset adds its
        class names (its name is only a directory name, `slug`)."""
        fields = {"name": slug or self.slug, "split_hash": self.split_hash}
        if self.info.converter == "folder":
            fields["classnames"] = list(self.classnames)
        return fields

    def image_path(self, key: str) -> Path:
        return self.image_root / key

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        return getattr(self, name)

    def select(self, keys: Iterable[str], split: str = "train") -> list[Sample]:
        """Samples of `split` for the given keys, in the given order (e.g. a few-shot selection)."""
        by_key = {sample.key: sample for sample in self.split(split)}
        keys = list(keys)
        unknown = [key for key in keys if key not in by_key]
        if unknown:
            raise DatasetError(f"{self.name}: {len(unknown)} key(s) are not in the {split} split of "
                               f"{self.split_path.name}, e.g. {unknown[:3]}")
        return [by_key[key] for key in keys]


def load_dataset(name: str | DatasetInfo, data_root, *, verify: bool = True) -> Dataset:
    """Read a dataset's split file and (by default) check that every listed image exists.

    `synthetic` is generated and `folder:<dir>` gets its split on first use; registry datasets whose split has
    to be converted from another format need `transagent datasets prepare NAME` first.
    """
    info = name if isinstance(name, DatasetInfo) else get_info(name)
    data_root = Path(data_root)
    split_path = info.split_path(data_root)
    if not split_path.exists():
        if info.converter == "synthetic":
            make_synthetic(data_root)
        elif info.converter == "folder":
            make_folder_split(info.dataset_dir(data_root))
        else:
            raise DatasetError(f"{info.name}: split file {split_path} not found; run `transagent datasets prepare "
                               f"{info.name} --data-root {data_root}`.\n{instructions(info, data_root)}")
    raw, split_hash = read_split(split_path)
    classnames, samples = _samples_and_classes(info, raw, split_path)
    dataset = Dataset(name=info.name, root=info.dataset_dir(data_root), image_root=info.image_root(data_root),
                      split_path=split_path, split_hash=split_hash, classnames=classnames, template=info.template,
                      transagent_template=info.transagent_template, info=info, **samples)
    if verify:
        check_images(dataset, data_root)
    return dataset


def _samples_and_classes(info: DatasetInfo, raw: dict, split_path: Path):
    fixed = {}       # raw class name -> fixed name
    names = {}       # label -> (fixed name, where first seen)
    samples = {}
    for split_name in SPLITS:
        seen, out = set(), []
        for index, (key, label, raw_name) in enumerate(raw[split_name]):
            name = fixed.get(raw_name)
            if name is None:
                name = fixed[raw_name] = info.class_renames.get(raw_name, raw_name).replace("_", " ")
            first = names.get(label)
            if first is None:
                if label < 0:
                    raise DatasetError(f"{split_path}: {split_name}[{index}] has negative label {label}")
                first = names[label] = (name, f"{split_name}[{index}]")
            if first[0] != name:
                raise DatasetError(f"{split_path}: label {label} is {first[0]!r} at {first[1]} but {name!r} at "
                                   f"{split_name}[{index}]; one label must have one class name")
            if key in seen:
                raise DatasetError(f"{split_path}: {key!r} is listed twice in {split_name}")
            seen.add(key)
            out.append(Sample(key, label, name))
        samples[split_name] = out
    if not names:
        raise DatasetError(f"{split_path}: the split lists no images")
    absent = sorted(set(range(max(names) + 1)) - set(names))
    if absent:
        raise DatasetError(f"{split_path}: labels must be 0..C-1 without gaps; label(s) {absent[:10]} never occur")
    classnames = [names[label][0] for label in range(len(names))]
    if info.num_classes is not None and len(classnames) != info.num_classes:
        raise DatasetError(f"{split_path}: {len(classnames)} classes, but {info.name} has {info.num_classes}; "
                           f"is this the right split file?")
    labels_of = defaultdict(list)
    for label, classname in enumerate(classnames):
        labels_of[classname].append(label)
    clashes = {name: labels for name, labels in labels_of.items() if len(labels) > 1}
    if clashes:
        raise DatasetError(f"{split_path}: class names shared by several labels: {clashes}")
    return classnames, samples


def check_images(dataset: Dataset, data_root) -> None:
    keys = [sample.key for split in SPLITS for sample in dataset.split(split)]
    missing = missing_images(dataset.image_root, keys)
    if missing:
        listed = "\n".join(f"  {key}" for key in missing[:MAX_LISTED])
        raise DatasetError(
            f"{dataset.name}: {len(missing)} of {len(keys)} images listed in {dataset.split_path.name} are missing "
            f"under {dataset.image_root}/; the first {min(len(missing), MAX_LISTED)}:\n{listed}\n"
            f"{instructions(dataset.info, data_root)}")

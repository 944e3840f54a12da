"""Converters from the split formats some datasets ship with into CoOp split JSON (run by `prepare`).

Each follows the matching CoOp reader (`datasets/imagenet.py`, `fgvc_aircraft.py`, `imagenetv2.py`,
`imagenet_sketch.py`, `imagenet_a.py`, `imagenet_r.py`), except that file lists are sorted: CoOp used
`os.listdir` order, which differs between file systems.
"""
import os
import shutil
from pathlib import Path

from pipelines.datasets.errors import DatasetError
from pipelines.datasets.registry import DatasetInfo, instructions
from pipelines.datasets.splitfile import write_split

CLASSNAMES_FILE = "classnames.txt"


def _require(info: DatasetInfo, data_root, paths: list[Path]) -> None:
    missing = [path for path in paths if not path.exists()]
    if missing:
        listed = "\n".join(f"  {path}" for path in missing)
        raise DatasetError(f"{info.name}: cannot build {info.split_file}; missing:\n{listed}\n"
                           f"{instructions(info, data_root)}")


def _dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _files(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))


def read_classnames(path: Path) -> dict[str, str]:
    """`<wnid> <class name>` per line -> {wnid: class name}, in file order."""
    names = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise DatasetError(f"{path}:{number}: expected '<wnid> <class name>', got {line!r}")
        names[wnid] = name
    return names


def _rows(image_root: Path, prefix: str, folders: list[str], classnames: list[str]) -> list[tuple]:
    """Every file of every class folder, label = position in `folders`; keys `<prefix><folder>/<file>`."""
    return [(f"{prefix}{folder}/{file}", label, classnames[label])
            for label, folder in enumerate(folders) for file in _files(image_root / prefix / folder)]


def _unknown_wnids(path: Path, folders: list[str], names: dict[str, str]) -> None:
    unknown = [folder for folder in folders if folder not in names]
    if unknown:
        raise DatasetError(f"{path}: folder(s) {unknown[:5]} are not in {CLASSNAMES_FILE} ({len(unknown)} in all)")


def convert_imagenet(info: DatasetInfo, data_root) -> Path:
    """images/train/<wnid>/ -> train, images/val/<wnid>/ -> test (CoOp evaluates on val), no val split."""
    root, image_root = info.dataset_dir(data_root), info.image_root(data_root)
    _require(info, data_root, [image_root / "train", image_root / "val", root / CLASSNAMES_FILE])
    names = read_classnames(root / CLASSNAMES_FILE)
    folders, val_folders = _dirs(image_root / "train"), _dirs(image_root / "val")
    if not val_folders and _files(image_root / "val"):
        raise DatasetError(f"{image_root / 'val'} holds files but no <wnid>/ folders; sort the validation images "
                           f"into one folder per class (e.g. with the common valprep.sh)")
    if set(val_folders) != set(folders):
        differ = sorted(set(val_folders) ^ set(folders))
        raise DatasetError(f"{image_root}: train/ and val/ have different class folders, e.g. {differ[:5]}")
    _unknown_wnids(image_root / "train", folders, names)
    if len(folders) != len(names):
        raise DatasetError(f"{root / CLASSNAMES_FILE} lists {len(names)} classes but {image_root / 'train'} has "
                           f"{len(folders)} class folders")
    classnames = [names[folder] for folder in folders]
    split = {"train": _rows(image_root, "train/", folders, classnames), "val": [],
             "test": _rows(image_root, "val/", folders, classnames)}
    write_split(info.split_path(data_root), split)
    return info.split_path(data_root)


def convert_fgvc_aircraft(info: DatasetInfo, data_root) -> Path:
    """variants.txt gives the labels; images_variant_<split>.txt lines are '<image id> <variant name>'."""
    root = info.dataset_dir(data_root)
    lists = {name: root / f"images_variant_{name}.txt" for name in ("train", "val", "test")}
    _require(info, data_root, [info.image_root(data_root), root / "variants.txt", *lists.values()])
    variants = [line.strip() for line in (root / "variants.txt").read_text(encoding="utf-8").splitlines()
                if line.strip()]
    label_of = {name: label for label, name in enumerate(variants)}
    split = {}
    for name, path in lists.items():
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{path}:{number}: variant {variant!r} is not in variants.txt")
            rows.append((f"{image_id}.jpg", label_of[variant], variant))
        split[name] = rows
    write_split(info.split_path(data_root), split)
    return info.split_path(data_root)


def _variant_classnames(info: DatasetInfo, data_root) -> dict[str, str]:
    """The ImageNet class names; copied from <data root>/imagenet/ when the variant has none yet."""
    path = info.dataset_dir(data_root) / CLASSNAMES_FILE
    source = Path(data_root) / "imagenet" / CLASSNAMES_FILE
    if not path.exists() and source.exists() and info.dataset_dir(data_root).is_dir():
        shutil.copyfile(source, path)
    _require(info, data_root, [info.image_root(data_root), path])
    return read_classnames(path)


def convert_imagenet_v2(info: DatasetInfo, data_root) -> Path:
    """Folders 0/ ... 999/ are label indices into classnames.txt (test only)."""
    names = list(_variant_classnames(info, data_root).values())
    image_root = info.image_root(data_root)
    folders, expected = _dirs(image_root), [str(label) for label in range(len(names))]
    if set(folders) != set(expected):
        differ = sorted(set(folders) ^ set(expected), key=lambda f: (len(f), f))
        raise DatasetError(f"{image_root}: expected folders 0..{len(names) - 1} (one per line of "
                           f"{CLASSNAMES_FILE}); differing: {differ[:5]}")
    split = {"train": [], "val": [], "test": _rows(image_root, "", expected, names)}
    write_split(info.split_path(data_root), split)
    return info.split_path(data_root)


def convert_imagenet_wnid_folders(info: DatasetInfo, data_root) -> Path:
    """One <wnid>/ folder per class; labels follow the sorted folders (200 for -A/-R, 1000 for -Sketch)."""
    names = _variant_classnames(info, data_root)
    image_root = info.image_root(data_root)
    folders = _dirs(image_root)
    _unknown_wnids(image_root, folders, names)
    split = {"train": [], "val": [], "test": _rows(image_root, "", folders, [names[f] for f in folders])}
    write_split(info.split_path(data_root), split)
    return info.split_path(data_root)


CONVERTERS = {
    "imagenet": convert_imagenet,
    "fgvc_aircraft": convert_fgvc_aircraft,
    "imagenet_v2": convert_imagenet_v2,
    "imagenet_wnid_folders": convert_imagenet_wnid_folders,
}

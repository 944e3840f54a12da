"""`folder:<dir>`: a lab's own images, one subfolder per class, with an optional CoOp-format `split.json`.

Without a split file, a 50/20/30 train/val/test split per class is drawn once - deterministically, from each
class folder's name - and written next to the images, so every later run (and every lab member) uses the same one.
"""
import os
import random
from pathlib import Path

from pipelines.datasets.errors import DatasetError
from pipelines.datasets.splitfile import SPLITS, write_split

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESERVED = {"fewshot"}   # sub-directories of ours that are not classes
FRACTIONS = (0.5, 0.2)   # train, val; test gets the rest (CoOp's read_and_split_data)
SPLIT_FILE = "split.json"


def class_folders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and not entry.name.startswith(".") and entry.name not in RESERVED)


def image_files(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and not entry.name.startswith(".")
                  and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES)


def folder_split(root: Path) -> dict:
    """Labels follow the sorted class folder names; each class is shuffled by a RNG seeded with its name."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory; a folder dataset is <dir>/<class name>/<images>")
    classes = class_folders(root)
    if not classes:
        raise DatasetError(f"{root}: no class subfolders; a folder dataset is <dir>/<class name>/<images>")
    split = {name: [] for name in SPLITS}
    for label, name in enumerate(classes):
        files = image_files(root / name)
        n_train, n_val = (round(len(files) * fraction) for fraction in FRACTIONS)
        if n_train < 1 or n_val < 1 or len(files) - n_train - n_val < 1:
            raise DatasetError(f"{root / name}: {len(files)} images; a 50/20/30 split needs at least 4 per class "
                               f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
        random.Random(name).shuffle(files)
        parts = files[:n_train], files[n_train:n_train + n_val], files[n_train + n_val:]
        for split_name, part in zip(SPLITS, parts, strict=True):
            split[split_name].extend((f"{name}/{file}", label, name) for file in sorted(part))
    return split


def make_folder_split(root: Path) -> Path:
    """Write `<root>/split.json` unless it exists; returns its path."""
    path = Path(root) / SPLIT_FILE
    if not path.exists():
        write_split(path, folder_split(root))
    return path

"""The dataset registry: what each dataset is called, where its files live and how to obtain them.

The table itself is data (`registry.json`, transcribed from CoOp's `datasets/*.py` and `docs/DATASETS.md`); this
module only turns it into typed records and renders the "which file goes where" instructions.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from pipelines.datasets.errors import DatasetError

REGISTRY_FILE = Path(__file__).with_name("registry.json")
FOLDER_PREFIX = "folder:"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a directory name that needs no quoting or escaping


@dataclass(frozen=True)
class Source:
    """One file or folder a dataset needs, relative to its directory, and where it comes from."""
    path: str                 # relative to the dataset directory; a trailing "/" marks a folder
    what: str
    url: str | None = None
    md5: str | None = None
    how: str | None = None    # what to do with the download
    download: str | None = None  # archive type ("zip") when `prepare` may fetch and extract it itself


@dataclass(frozen=True)
class DatasetInfo:
    name: str                  # CLI name, lowercase
    coop_name: str             # CoOp/Dassl class name (keys of CoOp's template tables and LLM description files)
    directory: str             # dataset directory under the data root
    image_dir: str             # image root under the dataset directory ("" = the directory itself)
    split_file: str            # CoOp-format split JSON under the dataset directory
    num_classes: int | None    # expected class count; None = whatever the split says
    template: str              # CoOp CUSTOM_TEMPLATES entry (zero-shot CLIP, T2I conditioning)
    transagent_template: str   # official TransAgent DS_TEMPLATE entry (PixArt/BLIP-2/Shikra text, cross-dataset)
    class_renames: Mapping[str, str] = field(default_factory=dict)  # CoOp NEW_CNAMES
    converter: str | None = None  # how `prepare` builds the split from local files (see pipelines/datasets/convert.py)
    test_only: bool = False
    sources: tuple[Source, ...] = ()

    def dataset_dir(self, data_root) -> Path:
        return Path(data_root) / self.directory

    def image_root(self, data_root) -> Path:
        return self.dataset_dir(data_root) / self.image_dir

    def split_path(self, data_root) -> Path:
        return self.dataset_dir(data_root) / self.split_file


def _load_registry() -> dict[str, DatasetInfo]:
    entries = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))["datasets"]
    registry = {}
    for entry in entries:
        entry = dict(entry)
        entry["sources"] = tuple(Source(**source) for source in entry.get("sources", ()))
        entry["class_renames"] = MappingProxyType(dict(entry.get("class_renames", {})))
        info = DatasetInfo(**entry)
        if info.name in registry:
            raise ValueError(f"{REGISTRY_FILE}: dataset {info.name!r} is listed twice")
        registry[info.name] = info
    return registry


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(_load_registry())


def known_names() -> list[str]:
    return list(DATASETS) + [FOLDER_PREFIX + "<dir>"]


def folder_info(name: str) -> DatasetInfo:
    """A lab's own images: `folder:<dir>` = class subfolders under <data root>/<dir> (or an absolute <dir>)."""
    directory = name[len(FOLDER_PREFIX):]
    if not directory:
        raise DatasetError(f"{name!r}: write folder:<dir>, where <dir> holds one subfolder of images per class")
    return DatasetInfo(
        name=name, coop_name="Folder", directory=directory, image_dir="", split_file="split.json", num_classes=None,
        template="a photo of a {}.", transagent_template="a photo of a {}.", converter="folder",
        sources=(Source("<class name>/", "one folder of images per class (the folder name is the class name)"),
                 Source("split.json", "optional CoOp-format split; when absent a 50/20/30 split per class is "
                        "drawn deterministically and written here on first use")))


def dataset_slug(name: str, override: str | None = None) -> str:
    """The directory name of a dataset's caches and runs (`<cache root>/<slug>/`, `<runs root>/<slug>/`).

    A registry dataset is its CLI name; a folder dataset `folder:<dir>` is `folder-<last part of dir>`, so the same
    images give the same paths under any data root and no absolute path reaches a directory name or fingerprint.
    `override` (`--dataset-name`) names a folder dataset explicitly, e.g. to keep two folders called alike apart.
    Unknown names come back as they are (loading them is the error)."""
    if override is not None:
        if not name.startswith(FOLDER_PREFIX):
            raise DatasetError(f"--dataset-name {override!r}: only folder datasets take a name; {name!r} has its own")
        if not DATASET_NAME.fullmatch(override):
            raise DatasetError(f"--dataset-name {override!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
                               "with a letter or digit")
        if override in DATASETS:
            raise DatasetError(f"--dataset-name {override!r} is the name of a registry dataset; choose another")
        return override
    if name.startswith(FOLDER_PREFIX):
        return "folder-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name[len(FOLDER_PREFIX):]).name or "root")
    try:
        return get_info(name).name
    except DatasetError:
        return name


def get_info(name: str) -> DatasetInfo:
    """Registry entry by CLI name (or CoOp class name, case-insensitive); `folder:<dir>` for a lab's own data."""
    if name.startswith(FOLDER_PREFIX):
        return folder_info(name)
    if name in DATASETS:
        return DATASETS[name]
    for info in DATASETS.values():
        if name.lower() in (info.name, info.coop_name.lower()):
            return info
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(known_names())}")


def instructions(info: DatasetInfo, data_root) -> str:
    """Which file goes where, for a human: every source with its URL and what to do with it."""
    root = info.dataset_dir(data_root)
    width = max(len(source.path) for source in info.sources) + 2
    lines = [f"{info.name} expects these files under {root}/:"]
    for source in info.sources:
        lines.append(f"  {source.path:<{width}}{source.what}")
        if source.url:
            checksum = f"  (md5 {source.md5})" if source.md5 else ""
            lines.append(f"  {'':<{width}}from {source.url}{checksum}")
        if source.how:
            lines.append(f"  {'':<{width}}{source.how}")
        if source.download:
            lines.append(f"  {'':<{width}}`transagent datasets prepare {info.name}` downloads and extracts this itself")
    return "\n".join(lines)

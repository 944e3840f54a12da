"""The dataset registry: what each dataset is called, where its files live and how to obtain them.

The table itself is data (`registry.json`, transcribed from CoOp's `datasets/*.py` and `docs/DATASETS.md`, and
`official_descriptions.json`, the official TransAgent description files at a pinned commit); this module only turns
it into typed records, applies a lab's overrides (`TRANSAGENT_REGISTRY`) and renders the "which file goes where"
instructions.
"""
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from pipelines.datasets.errors import DatasetError

REGISTRY_FILE = Path(__file__).with_name("registry.json")
DESCRIPTIONS_FILE = Path(__file__).with_name("official_descriptions.json")
OVERRIDES_ENV = "TRANSAGENT_REGISTRY"
FOLDER_PREFIX = "folder:"
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a directory name that needs no quoting or escaping
# official description folders (sources of the official release) -> the agent whose descriptions they are
DESCRIPTION_FOLDERS = {"template_protext/": "gpt3", "template/": "vicuna"}


@dataclass(frozen=True)
class Source:
    """One file or folder a dataset needs, relative to its directory, and where it comes from."""
    path: str                 # relative to the dataset directory; a trailing "/" marks a folder
    what: str
    url: str | None = None
    md5: str | None = None
    how: str | None = None    # what to do with the download
    download: str | None = None  # "zip" (fetched and extracted) or "file" (fetched as is) when `prepare` may fetch it
    sha256: str | None = None    # published hash; None = pinned in the dataset directory at first download

    @property
    def description_agent(self) -> str | None:
        """'gpt3' / 'vicuna' for an official description file (descriptions/<agent>.json), else None."""
        match = re.fullmatch(r"descriptions/(\w+)\.json", self.path)
        return match.group(1) if match else None


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


def _official_descriptions() -> dict[str, tuple[Source, ...]]:
    """CoOp class name -> the Source of each official description file (GPT-3 first, then Vicuna)."""
    table = json.loads(DESCRIPTIONS_FILE.read_text(encoding="utf-8"))
    out: dict[str, list[Source]] = {}
    for folder, agent in DESCRIPTION_FOLDERS.items():
        for entry in table["files"]:
            if not entry["path"].startswith(folder):
                continue
            coop_name = entry["path"][len(folder):].removesuffix("_prompts.json")
            what = {"gpt3": "official GPT-3 descriptions (ProText)", "vicuna": "official Vicuna descriptions"}[agent]
            out.setdefault(coop_name, []).append(Source(
                path=f"descriptions/{agent}.json", what=f"{what}, {table['repository']} {entry['path']}",
                url=table["raw_url"].format(path=entry["path"]), sha256=entry["sha256"], download="file"))
    return {name: tuple(sources) for name, sources in out.items()}


def _load_registry() -> dict[str, DatasetInfo]:
    entries = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))["datasets"]
    descriptions = _official_descriptions()
    registry = {}
    for entry in entries:
        entry = dict(entry)
        entry["sources"] = (tuple(Source(**source) for source in entry.get("sources", ()))
                            + descriptions.get(entry["coop_name"], ()))
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


HASH_LENGTHS = {"md5": 32, "sha256": 64}


def registry_overrides() -> dict[str, dict[str, dict]]:
    """`$TRANSAGENT_REGISTRY` (a JSON file): {"datasets": {name: {source path: {"url", "md5", "sha256"}}}}, e.g. a
    lab mirror. Its "agents" key belongs to the agent loaders; other keys are refused unless they start with "_"."""
    path = os.environ.get(OVERRIDES_ENV, "").strip()
    if not path:
        return {}
    where = f"{OVERRIDES_ENV}={path}"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(f"{where}: cannot read the file ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{where}: not valid UTF-8 JSON ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object with a \"datasets\" key")
    unknown = sorted(key for key in data if key not in ("datasets", "agents") and not key.startswith("_"))
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {unknown}; known: \"datasets\", \"agents\"")
    datasets = data.get("datasets", {})
    if not isinstance(datasets, dict):
        raise DatasetError(f"{where}: \"datasets\" must map dataset names to {{source path: {{url, md5, sha256}}}}")
    for name, entries in datasets.items():
        if name not in DATASETS:
            raise DatasetError(f"{where}: datasets.{name}: unknown dataset; known: {', '.join(DATASETS)}")
        paths = [source.path for source in DATASETS[name].sources]
        if not isinstance(entries, dict):
            raise DatasetError(f"{where}: datasets.{name} must map source paths ({', '.join(paths)}) to objects")
        for source_path, entry in entries.items():
            at = f"{where}: datasets.{name}[{source_path!r}]"
            if source_path not in paths:
                raise DatasetError(f"{at}: {name} has no such source; its sources: {', '.join(paths)}")
            if not isinstance(entry, dict) or not entry or set(entry) - {"url", *HASH_LENGTHS}:
                raise DatasetError(f"{at}: expected an object with some of \"url\", \"md5\", \"sha256\"")
            if "url" in entry and not (isinstance(entry["url"], str) and re.match(r"(https?|file)://", entry["url"])):
                raise DatasetError(f"{at}.url: expected an http(s):// or file:// URL, got {entry['url']!r}")
            for kind, length in HASH_LENGTHS.items():
                value = entry.get(kind)
                if value is not None and not (isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", value)):
                    raise DatasetError(f"{at}.{kind}: expected {length} lower-case hex digits or null, got {value!r}")
    return datasets


def download_sources(info: DatasetInfo) -> tuple[Source, ...]:
    """The dataset's sources with the `$TRANSAGENT_REGISTRY` overrides applied (URL and hashes)."""
    overrides = registry_overrides().get(info.name, {})
    return tuple(replace(source, **overrides[source.path]) if source.path in overrides else source
                 for source in info.sources)


def instructions(info: DatasetInfo, data_root) -> str:
    """Which file goes where, for a human: every source with its URL and what to do with it."""
    root = info.dataset_dir(data_root)
    width = max(len(source.path) for source in info.sources) + 2
    lines = [f"{info.name} expects these files under {root}/:"]
    for source in info.sources:
        lines.append(f"  {source.path:<{width}}{source.what}")
        if source.url:
            checksum = f"  (md5 {source.md5})" if source.md5 else (f"  (sha256 {source.sha256})" if source.sha256
                                                                    else "")
            lines.append(f"  {'':<{width}}from {source.url}{checksum}")
        if source.how:
            lines.append(f"  {'':<{width}}{source.how}")
        if source.download:
            action = "downloads and extracts this" if source.download == "zip" else "downloads this"
            lines.append(f"  {'':<{width}}`transagent datasets prepare {info.name}` {action} itself")
    return "\n".join(lines)

"""`prepare`: get a dataset into the CoOp layout and verify it before any model is loaded.

Order: download what has a stable, checksummed URL (EuroSAT), convert split formats (ImageNet, FGVCAircraft, the
ImageNet variants), generate what is ours (synthetic, folder splits), then load and verify against the split.
Whatever cannot be fetched is explained file by file (split JSONs live on Google Drive, ImageNet needs an account).
"""
import hashlib
import shutil
import urllib.request
import zipfile
from pathlib import Path

from pipelines.datasets.convert import CONVERTERS
from pipelines.datasets.dataset import Dataset, load_dataset
from pipelines.datasets.errors import DatasetError
from pipelines.datasets.registry import DatasetInfo, Source, get_info, instructions
from pipelines.progress import copy


def prepare(name: str | DatasetInfo, data_root, *, download: bool = True, echo=print) -> Dataset:
    """Make `name` ready under `data_root` and return it verified; DatasetError says what is still missing."""
    info = name if isinstance(name, DatasetInfo) else get_info(name)
    data_root = Path(data_root)
    if info.converter == "synthetic":
        from pipelines.datasets.synthetic import make_synthetic
        make_synthetic(data_root)
    for source in info.sources:
        if source.download and not (info.dataset_dir(data_root) / source.path).exists():
            if not download:
                echo(f"{info.name}: {source.path} is missing (not downloading: --no-download)")
                continue
            _download_and_extract(info, data_root, source, echo)
    split_path = info.split_path(data_root)
    if not split_path.exists() and info.converter in CONVERTERS:
        echo(f"{info.name}: converting to {split_path}")
        CONVERTERS[info.converter](info, data_root)
    if not split_path.exists() and info.converter != "folder":
        raise DatasetError(f"{info.name}: not ready, {split_path.name} is missing.\n{instructions(info, data_root)}")
    return load_dataset(info, data_root)


def _download_and_extract(info: DatasetInfo, data_root: Path, source: Source, echo) -> None:
    root = info.dataset_dir(data_root)
    archive = root / ".downloads" / source.url.rsplit("/", 1)[-1]
    archive.parent.mkdir(parents=True, exist_ok=True)
    if not archive.exists():
        echo(f"{info.name}: downloading {source.url}")
        partial = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response, open(partial, "wb") as file:
                length = response.headers.get("Content-Length")
                copy(response, file, int(length) if length and length.isdigit() else None, f"download {archive.name}")
        except OSError as error:
            raise DatasetError(f"{info.name}: download of {source.url} failed ({error}).\n"
                               f"{instructions(info, data_root)}") from None
        partial.replace(archive)
    if source.md5 and _md5(archive) != source.md5:
        raise DatasetError(f"{archive}: md5 {_md5(archive)} != expected {source.md5}; delete it and retry")
    if source.download != "zip":
        raise DatasetError(f"{info.name}: unsupported archive type {source.download!r} for {source.url}")
    echo(f"{info.name}: extracting {archive.name} into {root}")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(root)   # zipfile drops absolute paths and '..' from member names
    if not (root / source.path).exists():
        raise DatasetError(f"{archive} did not contain {source.path}")
    archive.unlink()


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_status(info: DatasetInfo, data_root) -> tuple[str, str]:
    """Cheap (no per-image check) status for `datasets ls`: (images, split), e.g. ("yes", "run prepare")."""
    image_root, split_path = info.image_root(data_root), info.split_path(data_root)
    if info.converter == "synthetic" and not split_path.exists():
        return "on first use", "on first use"
    images = "yes" if image_root.is_dir() and any(image_root.iterdir()) else "no"
    if split_path.exists():
        split = "yes"
    elif info.converter in CONVERTERS and images == "yes":
        split = "run prepare"
    else:
        split = "no"
    return images, split

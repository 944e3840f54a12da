"""`prepare`: get a dataset into the CoOp layout and verify it before any model is loaded.

Order: download what has a stable URL (EuroSAT's images, CoOp's split files on Google Drive, the official
TransAgent description files), convert split formats (ImageNet, FGVCAircraft, the ImageNet variants), generate
what is ours (synthetic, folder splits), then load and verify against the split. Whatever cannot be fetched
(ImageNet needs an account, most image archives a manual step) is explained file by file.

Every download is checked before it is put in place: against its published hash (md5 or sha256), or, for files
published without one (the split files, ImageNet's description files), against the sha256 recorded in
`<dataset dir>/sha256-pins.json` when it was first downloaded there.
"""
import hashlib
import json
import logging
import re
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from pipelines.datasets.convert import CONVERTERS
from pipelines.datasets.dataset import Dataset, load_dataset
from pipelines.datasets.errors import DatasetError
from pipelines.datasets.registry import DatasetInfo, Source, download_sources, get_info, instructions
from pipelines.datasets.splitfile import read_split, write_atomic
from pipelines.datasets.synthetic import make_synthetic
from pipelines.progress import copy, enabled as progress_enabled

PINS_FILE = "sha256-pins.json"
DESCRIPTION_AGENTS = ("gpt3", "vicuna")
DRIVE_URL = re.compile(r"https://drive\.google\.com/(?:file/d/([\w-]+)|(?:open|uc)\?(?:[^#]*&)?id=([\w-]+))")

logger = logging.getLogger(__name__)


def prepare(name: str | DatasetInfo, data_root, *, download: bool = True, verify: bool = True,
            descriptions: tuple[str, ...] = DESCRIPTION_AGENTS) -> Dataset:
    """Make `name` ready under `data_root` and return it (verified unless `verify=False`); DatasetError says
    what is still missing. `descriptions`: the agents whose official description files are fetched. What is
    downloaded, pinned, converted or extracted is logged."""
    info = name if isinstance(name, DatasetInfo) else get_info(name)
    data_root = Path(data_root)
    if info.converter == "synthetic":
        make_synthetic(data_root)
    missing = {source.path for source in missing_downloads(info, data_root, descriptions)}
    for source in download_sources(info):
        if source.path not in missing:
            continue
        if not download:
            logger.info("%s: %s is missing (not downloading)", info.name, source.path)
            continue
        fetch(info, data_root, source)
    split_path = info.split_path(data_root)
    if not split_path.exists() and info.converter in CONVERTERS:
        logger.info("%s: converting to %s", info.name, split_path)
        CONVERTERS[info.converter](info, data_root)
    if not split_path.exists() and info.converter != "folder":
        raise DatasetError(f"{info.name}: not ready, {split_path.name} is missing.\n{instructions(info, data_root)}")
    dataset = load_dataset(info, data_root, verify=verify)
    _check_description_keys(dataset)
    return dataset


def missing_downloads(info: DatasetInfo, data_root, descriptions: tuple[str, ...] = DESCRIPTION_AGENTS) -> list:
    """The sources `prepare` would download: absent, downloadable, and (descriptions) of a wanted agent."""
    return [source for source in info.sources
            if source.download and not (info.dataset_dir(data_root) / source.path).exists()
            and (source.description_agent is None or source.description_agent in descriptions)]


def fetch(info: DatasetInfo, data_root: Path, source: Source) -> None:
    """Download one source, check it, and put it in place (a file as is, a zip extracted into the dataset dir)."""
    root = info.dataset_dir(data_root)
    if source.download == "zip":   # the archive's own name, or the folder's for a link without one (Drive)
        name = Path(urllib.parse.urlparse(source.url).path).name
        name = name if name.endswith(".zip") else Path(source.path.rstrip("/")).name + ".zip"
    else:
        name = Path(source.path).name + ".part"
    downloaded = root / ".downloads" / name
    downloaded.parent.mkdir(parents=True, exist_ok=True)
    if source.download not in ("zip", "file"):
        raise DatasetError(f"{info.name}: unsupported download type {source.download!r} for {source.path}")
    if not downloaded.exists():  # an archive downloaded before (and checked) is not fetched again
        logger.info("%s: downloading %s from %s", info.name, source.path, source.url)
        partial = downloaded.with_name(downloaded.name + ".tmp")
        try:
            _fetch_url(source.url, partial)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise DatasetError(f"{info.name}: download of {source.url} failed ({error}).\n"
                               f"{instructions(info, data_root)}") from None
        partial.replace(downloaded)
    try:
        pinned = _check_download(info, root, source, downloaded)
    except DatasetError:
        downloaded.unlink(missing_ok=True)
        raise
    if pinned:
        logger.info("%s: %s has no published hash; pinned its sha256 %s in %s", info.name, source.path, pinned,
                    root / PINS_FILE)
    target = root / source.path
    if source.download == "file":
        target.parent.mkdir(parents=True, exist_ok=True)
        downloaded.replace(target)
        return
    logger.info("%s: extracting %s into %s", info.name, downloaded.name, root)
    with zipfile.ZipFile(downloaded) as zipped:
        zipped.extractall(root)   # zipfile drops absolute paths and '..' from member names
    if not target.exists():
        raise DatasetError(f"{downloaded} did not contain {source.path}")
    downloaded.unlink()


def google_drive_id(url: str) -> str | None:
    """The file id of a Google Drive link (CoOp publishes its split files there), else None."""
    match = DRIVE_URL.match(url)
    return (match.group(1) or match.group(2)) if match else None


def _fetch_url(url: str, output: Path) -> None:
    """Google Drive links through gdown (Drive answers plain requests for large files with a confirmation page);
    every other URL (a published host, a lab mirror, file://) through urllib."""
    drive_id = google_drive_id(url)
    if drive_id is None:
        with urllib.request.urlopen(url, timeout=60) as response, open(output, "wb") as file:
            length = response.headers.get("Content-Length")
            copy(response, file, int(length) if length and length.isdigit() else None,
                 f"download {output.name.removesuffix('.tmp')}")
        return
    import gdown  # ~0.3 s: only for Drive links, not on every start of the CLI
    from gdown.exceptions import DownloadError

    try:
        written = gdown.download(id=drive_id, output=str(output), quiet=not progress_enabled())
    except DownloadError as error:
        raise OSError(f"gdown: {error}") from None
    if not written or not output.is_file():
        raise OSError(f"gdown could not fetch Google Drive file {drive_id}")


def _check_download(info: DatasetInfo, root: Path, source: Source, path: Path) -> str | None:
    """Published hash, or the pinned one; a first download's content is checked (a split file must parse,
    descriptions be JSON) and its sha256 pinned, which is returned."""
    for kind, expected in (("md5", source.md5), ("sha256", source.sha256)):
        if expected and _digest(path, kind) != expected:
            raise DatasetError(f"{source.url}: {kind} {_digest(path, kind)} != the published {expected}; "
                               f"the download was discarded, retry or check the URL")
    if source.md5 or source.sha256:
        return None
    pins_path = root / PINS_FILE
    pins = read_pins(pins_path)
    actual = _digest(path, "sha256")
    if source.path in pins:
        if pins[source.path] != actual:
            raise DatasetError(f"{source.url}: sha256 {actual} != {pins[source.path]} pinned for {source.path} at "
                               f"its first download ({pins_path}); the download was discarded. If the upstream "
                               f"file changed on purpose, delete its entry there.")
        return None
    if source.download == "file":
        _check_content(info, source, path)
    pins[source.path] = actual
    write_atomic(pins_path, (json.dumps(pins, indent=1, sort_keys=True) + "\n").encode())
    return actual


def _check_content(info: DatasetInfo, source: Source, path: Path) -> None:
    """What is pinned must be what was meant (a Drive error page must not become the pinned split file)."""
    if source.path == info.split_file:
        read_split(path)
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{source.url}: not a UTF-8 JSON file ({error}); the download was discarded") from None
    if source.description_agent and not (isinstance(data, dict) and data and all(
            isinstance(texts, list) and all(isinstance(text, str) for text in texts) for texts in data.values())):
        raise DatasetError(f"{source.url}: expected {{classname: [description, ...]}}; the download was discarded")


def read_pins(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        pins = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(pins, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in pins.items()):
        raise DatasetError(f"{path}: expected {{source path: sha256 (64 lower-case hex digits)}}")
    return pins


def _check_description_keys(dataset: Dataset) -> None:
    """Say now, not hours into an extraction, when an official description file misses some of the classes."""
    from extract.families.language import description_key  # stage 2 reads datasets and never imports extract

    for agent in DESCRIPTION_AGENTS:
        path = dataset.root / "descriptions" / f"{agent}.json"
        if not path.is_file() or not any(s.description_agent == agent for s in dataset.info.sources):
            continue
        try:
            keys = {description_key(name) for name in json.loads(path.read_text(encoding="utf-8"))}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            keys = set()
        missing = [name for name in dataset.classnames if description_key(name) not in keys]
        if missing:
            logger.warning("%s: %s has no descriptions for %d of %d classes (e.g. %s); %s will refuse it",
                           dataset.name, path, len(missing), dataset.num_classes, ", ".join(map(repr, missing[:3])),
                           agent)


def _digest(path: Path, kind: str) -> str:
    digest = hashlib.new(kind)
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

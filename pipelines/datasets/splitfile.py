"""CoOp split files: `{"train"|"val"|"test": [[relpath, label, classname], ...]}`.

We read any valid JSON of that shape and write one canonical form (one sample per line, UTF-8, "\\n"), so the
bytes - and therefore the split hash every cache fingerprint carries - depend only on the contents.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from pipelines.datasets.errors import DatasetError

SPLITS = ("train", "val", "test")


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so readers see either nothing or all of it (concurrent identical writers are harmless)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_split(split: dict) -> bytes:
    parts = []
    for name in SPLITS:
        rows = [json.dumps([key, int(label), classname], ensure_ascii=False) for key, label, classname in split[name]]
        body = "\n" + ",\n".join(rows) + "\n" if rows else ""
        parts.append(f'"{name}": [{body}]')
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode("utf-8")


def write_split(path: Path, split: dict) -> str:
    """Write a split in canonical form; returns its sha256."""
    data = encode_split(split)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_split(path: Path) -> tuple[dict, str]:
    """Parse and structurally validate a split file; returns ({split: [(key, label, classname)]}, sha256)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a valid UTF-8 JSON split file ({error})") from None
    if not isinstance(raw, dict) or not set(SPLITS) <= set(raw):
        raise DatasetError(f"{path}: a split file is a JSON object with keys {list(SPLITS)}")
    split = {}
    for name in SPLITS:
        if not isinstance(raw[name], list):
            raise DatasetError(f"{path}: {name!r} must be a list of [relpath, label, classname]")
        split[name] = [_parse_entry(path, name, index, entry) for index, entry in enumerate(raw[name])]
    return split, hashlib.sha256(data).hexdigest()


def _parse_entry(path, split_name, index, entry):
    if (not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str)
            or isinstance(entry[1], bool) or not isinstance(entry[1], int) or not isinstance(entry[2], str)):
        raise DatasetError(f"{path}: {split_name}[{index}] = {entry!r}; expected [relpath, integer label, classname]")
    key = entry[0]
    segments = key.split("/")
    if "\\" in key or "" in segments or "." in segments or ".." in segments:
        raise DatasetError(f"{path}: {split_name}[{index}]: {key!r} is not a relative POSIX path without '..' "
                           f"(keys are stored as written)")
    return key, entry[1], entry[2]

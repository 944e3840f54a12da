"""One agent's cache: `<cache_root>/<dataset>/<agent>/<fingerprint>/`.

    manifest.json                 schema version, fields (everything hashed), arrays, backend, status, checksums
    rows.json                     global row table [[key, view id], ...] (written when complete)
    segments/seg-00000.rows.json  the rows planned for one segment; the segment exists once this file does
    segments/seg-00000.zarr|.h5   its arrays
    segments/seg-00000.done.jsonl journal: one line per finished row with the sha256 of each array's row bytes as
                                  written; an hdf5 segment's last line seals it with the sha256 of the whole file
    files/<name>                  extra files (e.g. descriptions.json)

A run plans the rows it needs, resumes segments that a killed run left unfinished, puts new rows in new segments
(one writer per segment), and marks the cache complete last, atomically. Rows are found by (key, view id), never by
position.

Every file here may come from another machine, so everything read is validated and names only paths inside the
cache. Checksums catch accidents and careless edits (the manifest itself is not signed). Rows and hdf5 segments get
theirs from the bytes as written (journal lines, seals); a file already listed is verified against its recorded
checksum before rows are added, never re-hashed to be adopted. Schema 2 lists every file of a complete cache in
`checksums`; schema-1 caches (which left the journals and each zarr segment's group `zarr.json` unlisted) are still
read, with those files as their allowance.

This module holds the layout: names, paths, and the checked JSON files every part reads and writes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath

from cache_schema.arrays import ArraySpec
from cache_schema.backends import zarr_chunk_path
from cache_schema.errors import CorruptCacheError
from cache_schema.fingerprint import fingerprint


SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 1: journals and zarr group metadata unlisted (see `schema_1_allowance`)
MANIFEST = "manifest.json"
ROWS = "rows.json"
SEGMENTS = "segments"
FILES = "files"
READERS = ".readers"
NOT_CONTENT = (READERS, ".writer")
LOCK_PREFIXES = (".lock", "writer.lock")
SEGMENT_NAME = re.compile(r"seg-[0-9]{5,}")
ARRAY_NAME = re.compile(r"[A-Za-z0-9_]+")
SHA256 = re.compile(r"[0-9a-f]{64}")
Row = tuple[str, int]


def cache_dir(cache_root, dataset: str, agent: str, fields: dict) -> Path:
    """Where the cache for these fields lives; computable before any model is loaded."""
    return Path(cache_root) / dataset / agent / fingerprint(with_schema(fields))


def with_schema(fields: dict) -> dict:
    return {**fields, "schema_version": SCHEMA_VERSION}


def write_json_atomic(path: Path, data) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def json_bytes(data) -> bytes:
    """What `write_json_atomic` writes, so a file's checksum can be taken from the bytes instead of the disk."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def read_json(path: Path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{path} is not valid JSON ({error}); the cache is damaged") from None


def parse_json(data: bytes, where):
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCacheError(f"{where} is not valid JSON ({error}); the cache is damaged") from None


def as_rows(rows) -> list[Row]:
    return [(str(key), int(view)) for key, view in rows]


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kind_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def parse_rows(data, where) -> list[Row]:
    """A row table from disk: a JSON list of [key, view id] pairs."""
    if not isinstance(data, list):
        raise CorruptCacheError(f"{where}: a row table is a list of [key, view id] pairs, not {kind_name(data)}")
    for i, item in enumerate(data):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and is_int(item[1])):
            raise CorruptCacheError(f"{where}: entry {i} is {item!r}, not a [key, view id] pair")
    return [(key, view) for key, view in data]


def is_inside(relative) -> bool:
    """A relative POSIX path that stays inside the cache directory (no absolute path, `..`, backslash or empty part)."""
    if not isinstance(relative, str) or not relative or "\\" in relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


def valid_segment_name(name) -> bool:
    """`seg-00000`: segment names become file names, so nothing else (no separators, no `..`)."""
    return isinstance(name, str) and SEGMENT_NAME.fullmatch(name) is not None


def content_files(path) -> list[str]:
    """Every file of a cache directory (relative POSIX paths, sorted) that a complete manifest must list: all but
    manifest.json, the reader leases, the writer lock (`.writer/`, `.lock*`, `writer.lock*`) and `*.tmp`
    temporaries. Links and special files are included, so that `verify` can name them."""
    path = Path(path)
    found = []
    for directory, dirnames, filenames in os.walk(path):
        base = Path(directory)
        top = base == path
        keep = []
        for name in dirnames:
            if name.endswith(".tmp") or (top and _not_content(name)):
                continue
            if os.path.islink(base / name):  # a link to a directory: reported, never followed
                filenames.append(name)
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            if name.endswith(".tmp") or (top and (name == MANIFEST or _not_content(name))):
                continue
            found.append((base / name).relative_to(path).as_posix())
    return sorted(found)


def _not_content(top_level_name: str) -> bool:
    return top_level_name in NOT_CONTENT or top_level_name.startswith(LOCK_PREFIXES)


def required_files(manifest: dict) -> set[str]:
    """The files a complete cache of this manifest cannot lack (its checksums must list them)."""
    arrays = {name: ArraySpec.from_dict(spec) for name, spec in manifest["arrays"].items()}
    required = {ROWS}
    for segment in manifest["segments"]:
        name, rows = segment["name"], segment["rows"]
        required.add(f"{SEGMENTS}/{name}.rows.json")
        if manifest["schema_version"] >= 2:
            required.add(f"{SEGMENTS}/{name}.done.jsonl")
        if manifest["backend"] == "hdf5":
            required.add(f"{SEGMENTS}/{name}.h5")
            continue
        if manifest["schema_version"] >= 2:
            required.add(f"{SEGMENTS}/{name}.zarr/zarr.json")
        for array, spec in arrays.items():
            required.add(f"{SEGMENTS}/{name}.zarr/{array}/zarr.json")
            required.update(zarr_chunk_path(PurePosixPath(SEGMENTS, f"{name}.zarr"), array, row, spec).as_posix()
                            for row in range(rows))
    return required


def schema_1_allowance(manifest: dict) -> set[str]:
    """Files a schema-1 cache has without listing them: its journals and each zarr segment's group metadata."""
    if manifest["schema_version"] != 1:
        return set()
    allowed = set()
    for segment in manifest["segments"]:
        allowed.add(f"{SEGMENTS}/{segment['name']}.done.jsonl")
        if manifest["backend"] == "zarr":
            allowed.add(f"{SEGMENTS}/{segment['name']}.zarr/zarr.json")
    return allowed

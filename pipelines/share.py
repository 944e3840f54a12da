"""Push and pull cache packs through fsspec URLs (file://, s3://, gs://, ssh://, hf://; http(s):// read-only).

Remote layout (DESIGN.md §5): `<url>/<dataset>/<agent>/<fingerprint>.tar` and `<url>/index.json`, a JSON list of
{dataset, agent, fingerprint, rows, bytes, sha256, schema_version, checksums_sha256, created}, one per pack.
A push uploads the pack under a temporary name, moves it into place, then rewrites the index (read-modify-write;
two people pushing at the same instant can lose one index entry: push again). A pull never trusts the transport:
`cache_schema.install.install_pack` checks the sha256, the schema version and every file checksum before the cache
becomes visible.

Long steps take `progress`, a function (description) -> fsspec callback (`pipelines.progress.callback`); without
it nothing is drawn.
"""
from __future__ import annotations

import json
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.callbacks import NoOpCallback

from cache_schema import CacheError, list_caches
from cache_schema.install import Installed, check_name, install_pack
from cache_schema.layout import READABLE_SCHEMAS, SHA256
from cache_schema.leases import incoming_dir
from cache_schema.manifest import read_manifest
from cache_schema.pack import PACK_EXT, checksums_digest, pack_cache
from pipelines.cache_hints import explained

INDEX = "index.json"
READ_ONLY_PROTOCOLS = ("http", "https")
INDEX_FIELDS = ("dataset", "agent", "fingerprint", "rows", "bytes", "sha256", "schema_version")
INDEX_TYPES = {"dataset": str, "agent": str, "fingerprint": str, "rows": int, "bytes": int, "sha256": str,
               "schema_version": int, "checksums_sha256": str, "created": dict}
KIND_NAMES = {str: "a string", int: "an integer", dict: "an object"}


class RemoteError(CacheError):
    """A remote cannot be reached, read or written as asked."""


@contextmanager
def _talking_to(url: str, action: str):
    """Turn transport errors (fsspec, aiohttp, botocore, paramiko ...) into one error that names the URL."""
    try:
        yield
    except CacheError:
        raise
    except FileNotFoundError as error:
        raise RemoteError(f"cannot {action} {url}: not found ({error})") from None
    except Exception as error:  # noqa: BLE001 - every back-end has its own exception types
        raise RemoteError(f"cannot {action} {url}: {type(error).__name__}: {error}") from None


def open_remote(url: str):
    """(filesystem, root path without trailing slash, protocol) for a URL or a local path."""
    with _talking_to(url, "open"):
        try:
            fs, root = fsspec.core.url_to_fs(url)
        except ImportError as error:
            raise RemoteError(f"{url}: {error}; the sharing back-ends are extras: "
                              "pip install 'transagent-cache[share]'") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, root.rstrip("/"), protocol


def pack_url(root: str, dataset: str, agent: str, fingerprint: str) -> str:
    return f"{root}/{dataset}/{agent}/{fingerprint}{PACK_EXT}"


def read_index(url: str, missing_ok: bool = False) -> list[dict]:
    fs, root, _ = open_remote(url)
    return _read_index(fs, root, url, missing_ok)


def _read_index(fs, root: str, url: str, missing_ok: bool) -> list[dict]:
    with _talking_to(url, f"read {INDEX} from"):
        try:
            data = fs.cat_file(f"{root}/{INDEX}")
        except FileNotFoundError:
            if missing_ok:   # a new remote
                return []
            raise
    try:
        entries = json.loads(data)
    except json.JSONDecodeError as error:
        raise RemoteError(f"{url}/{INDEX} is not valid JSON ({error})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and set(INDEX_FIELDS) <= set(e) for e in entries):
        raise RemoteError(f"{url}/{INDEX} is not a cache index (a list of {{{', '.join(INDEX_FIELDS)}}})")
    for number, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            raise RemoteError(f"{url}/{INDEX}: entry {number} {problem}; fix or remove that entry")
    return entries


def _entry_problem(entry: dict) -> str | None:
    """What is wrong with one index entry's types and values (None: nothing)."""
    for name, kind in INDEX_TYPES.items():
        if name not in entry:
            continue
        value = entry[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"has {name} {value!r}, not {KIND_NAMES[kind]}"
    for name in ("dataset", "agent", "fingerprint"):
        try:
            check_name(INDEX, name, entry[name])
        except CacheError:
            return f"has {name} {entry[name]!r}, not a directory name"
    for name in ("rows", "bytes"):
        if entry[name] < 0:
            return f"has {name} {entry[name]}"
    if not SHA256.fullmatch(entry["sha256"]):
        return f"has sha256 {entry['sha256']!r}, not a sha256 hex digest"
    return None


def _key(entry: dict) -> tuple[str, str, str]:
    return entry["dataset"], entry["agent"], entry["fingerprint"]


def _callback(progress, description: str):
    return progress(description) if progress is not None else NoOpCallback()


# ---------------------------------------------------------------------------------------------- push
def push(cache_dir, url: str, replace: bool = False, progress=None) -> tuple[dict, str]:
    """Pack a complete cache and upload it with its index entry. Returns (entry, "pushed" | "present" | "replaced").

    A remote pack of the same fingerprint but other content is only overwritten with replace=True (pull it and
    `cache merge` first, or its rows are lost to others).
    """
    cache_dir = Path(cache_dir)
    fs, root, protocol = open_remote(url)
    if protocol in READ_ONLY_PROTOCOLS:
        raise RemoteError(f"{url}: http(s) remotes are read-only; push to file://, s3://, gs:// or ssh:// and serve "
                          "that directory over http")
    manifest = read_manifest(cache_dir / "manifest.json") if (cache_dir / "manifest.json").is_file() else {}
    existing = {_key(e): e for e in _read_index(fs, root, url, missing_ok=True)}
    key = (manifest.get("dataset"), manifest.get("agent"), cache_dir.name)
    if key in existing and manifest.get("status") == "complete":
        if existing[key].get("checksums_sha256") == checksums_digest(manifest):
            return existing[key], "present"
        if not replace:
            raise RemoteError(f"{url} already holds {'/'.join(key)} with other content ({existing[key]['rows']} "
                              f"rows there, {manifest.get('rows')} here); pull it, `transagent cache merge` it into "
                              "yours, then push with --replace")
    name = "/".join(str(part) for part in key)
    with incoming_dir(cache_dir.parent) as scratch:   # beside the cache: same disk, never under list_caches' glob
        with _callback(progress, f"pack {name}") as callback:
            info = pack_cache(cache_dir, scratch / f"{cache_dir.name}{PACK_EXT}", callback=callback)
        target = pack_url(root, info.dataset, info.agent, info.fingerprint)
        temporary = f"{target}.tmp-{secrets.token_hex(4)}"
        with _talking_to(url, "upload to"), _callback(progress, f"upload {name}") as callback:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(scratch / f"{cache_dir.name}{PACK_EXT}"), temporary, callback=callback)
            fs.mv(temporary, target)
    entry = info.to_dict()
    entries = {_key(e): e for e in _read_index(fs, root, url, missing_ok=True)}  # re-read: others may have pushed
    status = "replaced" if key in entries else "pushed"
    entries[_key(entry)] = entry
    data = json.dumps([entries[k] for k in sorted(entries)], indent=1, sort_keys=True) + "\n"
    with _talking_to(url, f"write {INDEX} to"):
        temporary = f"{root}/{INDEX}.tmp-{secrets.token_hex(4)}"
        fs.pipe_file(temporary, data.encode())
        fs.mv(temporary, f"{root}/{INDEX}")
    return entry, status


@dataclass
class PushResult:
    name: str                    # dataset/agent/fingerprint
    entry: dict | None = None
    status: str = ""             # pushed | present | replaced | skipped (partial) | failed
    error: str = ""


def push_root(path, url: str, dataset: str | None = None, agent: str | None = None,
              fingerprint: str | None = None, replace: bool = False, keep_going: bool = False,
              progress=None) -> list[PushResult]:
    """Push one cache directory, or every complete cache under a cache root that matches the filters (partial ones
    are skipped, they cannot be packed). With keep_going a failed push is reported and the others still run."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        if dataset or agent or fingerprint:
            raise RemoteError(f"{path} is one cache; --dataset, --agent and --fingerprint select caches under a "
                              "cache root")
        entry, status = push(path, url, replace=replace, progress=progress)
        return [PushResult("/".join(_key(entry)), entry, status)]
    if not path.is_dir():
        raise RemoteError(f"{path}: neither a cache directory nor a cache root")
    found = [(cache, manifest) for cache, manifest in list_caches(path, dataset, agent)
             if fingerprint is None or cache.name == fingerprint]
    if not found:
        wanted = ", ".join(f"{k}={v}" for k, v in (("dataset", dataset), ("agent", agent),
                                                    ("fingerprint", fingerprint)) if v) or "anything"
        listed = ", ".join(c.relative_to(path).as_posix() for c, _ in list_caches(path)) or "nothing"
        raise RemoteError(f"no cache under {path} matches {wanted}; it holds: {listed}")
    results = []
    for cache, manifest in found:
        name = cache.relative_to(path).as_posix()
        if manifest.get("status") != "complete" or manifest.get("problem"):
            results.append(PushResult(name, None, "skipped",
                                      manifest.get("problem") or f"{manifest.get('status', 'unknown')} cache"))
            continue
        try:
            entry, status = push(cache, url, replace=replace, progress=progress)
            results.append(PushResult(name, entry, status))
        except CacheError as error:
            if not keep_going:
                raise
            results.append(PushResult(name, None, "failed", explained(error)))
    return results


# ---------------------------------------------------------------------------------------------- pull
@dataclass
class PullResult:
    name: str                    # dataset/agent/fingerprint, or the pack URL
    path: Path | None = None
    status: str = ""             # installed | present | failed
    error: str = ""


def pull(url: str, cache_root, dataset: str | None = None, agent: str | None = None,
         fingerprint: str | None = None, keep_going: bool = False, wait: float = 0.0,
         progress=None) -> list[PullResult]:
    """Pull every pack of the remote's index that matches the filters (or one `.tar` URL) into the cache root.

    With keep_going, a failed pack is reported in its result and the others are still pulled. A local cache of
    the same fingerprint that another process is writing stops that pack (or is waited for, `wait` seconds).
    """
    cache_root = Path(cache_root)
    fs, root, _ = open_remote(url)
    if root.endswith(PACK_EXT):
        return [_pull_one(fs, root, url, cache_root, None, keep_going, wait, progress)]
    entries = _read_index(fs, root, url, missing_ok=False)
    selected = [e for e in entries if (dataset is None or e["dataset"] == dataset) and
                (agent is None or e["agent"] == agent) and (fingerprint is None or e["fingerprint"] == fingerprint)]
    if not selected:
        wanted = ", ".join(f"{k}={v}" for k, v in (("dataset", dataset), ("agent", agent),
                                                    ("fingerprint", fingerprint)) if v) or "anything"
        listed = ", ".join("/".join(_key(e)) for e in entries) or "nothing"
        raise RemoteError(f"{url}/{INDEX} lists no cache matching {wanted}; it lists: {listed}")
    return [_pull_one(fs, pack_url(root, *_key(entry)), url, cache_root, entry, keep_going, wait, progress)
            for entry in selected]


def _pull_one(fs, remote: str, url: str, cache_root: Path, entry: dict | None, keep_going: bool,
              wait: float = 0.0, progress=None) -> PullResult:
    name = "/".join(_key(entry)) if entry else remote
    try:
        path, status = _install(fs, remote, url, cache_root, entry, wait, progress)
        return PullResult(name, path, status)
    except CacheError as error:
        if not keep_going:
            raise
        return PullResult(name, None, "failed", explained(error))


def _install(fs, remote: str, url: str, cache_root: Path, entry: dict | None, wait: float = 0.0,
             progress=None) -> tuple[Path, str]:
    if entry is not None:
        for field in ("dataset", "agent", "fingerprint"):
            check_name(f"{url}/{INDEX}", field, entry[field])
        if entry["schema_version"] not in READABLE_SCHEMAS:
            raise RemoteError(f"{url}: {'/'.join(_key(entry))} has cache schema version {entry['schema_version']}, "
                              f"this code reads versions {' and '.join(map(str, READABLE_SCHEMAS))}; use the "
                              "release that wrote it")
        local = cache_root.joinpath(*_key(entry))
        if (local / "manifest.json").is_file():   # skip the download when an identical cache is already here
            try:
                manifest = read_manifest(local / "manifest.json")
            except CacheError as error:
                raise CacheError(f"{local} is already there but unusable ({error}); check it with `transagent "
                                 "cache verify`, and delete it to pull it again") from None
            if manifest.get("status") == "complete" and checksums_digest(manifest) == entry.get("checksums_sha256"):
                return local, "present"
    with incoming_dir(cache_root) as scratch:
        download = scratch / remote.rsplit("/", 1)[-1]
        with _talking_to(fs.unstrip_protocol(remote), "download"), \
                _callback(progress, f"download {'/'.join(remote.rsplit('/', 3)[-3:])}") as callback:
            fs.get_file(remote, str(download), callback=callback)
        installed: Installed = install_pack(download, cache_root, expected=entry, wait=wait)
    return installed.path, installed.status

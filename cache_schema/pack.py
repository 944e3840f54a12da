"""Moving caches between machines and people: pack, install, merge, and garbage collection.

A pack is one uncompressed tar per agent cache, members named `<fingerprint>/...`, written deterministically
(manifest first, then every other path sorted; mtime 0, uid/gid 0, fixed modes), so two packs of the same cache are
byte-identical and a pack's sha256 names its content. Nothing in a cache or a pack is ever a pickle.

Installing a pack (`install_pack`) unpacks into `<cache_root>/.incoming/`, refuses links and paths that leave the
pack, checks the schema version and every checksum of the manifest, and only then renames the directory to
`<cache_root>/<dataset>/<agent>/<fingerprint>/`: a damaged pack never becomes visible.

A process that uses a cache holds a lease, `with reading(cache_dir): ...` (a file `.readers/<pid>@<host>-<token>`);
`gc` never deletes a cache with a live lease.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cache_schema.errors import (CacheError, CorruptCacheError, FingerprintMismatch, PartialCacheError,
                                 SchemaVersionError)
from cache_schema.fingerprint import canonical_json, differing_fields, sha256_file
from cache_schema.store import (FILES, MANIFEST, ROWS, SCHEMA_VERSION, AgentCache, CacheReader, check_schema,
                                list_caches, read_json, verify)

PACK_EXT = ".tar"
READERS = ".readers"
INCOMING = ".incoming"   # pulls in progress: <cache_root>/.incoming/<lease>/... (never matched by list_caches)
TRASH = ".trash"         # caches being deleted by gc: renamed here first, then removed
_CHUNK = 1 << 22


class MergeConflict(CacheError):
    """The same (key, view) or file exists in both caches with different bytes."""


# ---------------------------------------------------------------------------------------------- leases
def _lease_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}"


@contextmanager
def reading(cache_dir):
    """Hold a lease on a cache while using it, so `gc` leaves it alone. A read-only cache gets no lease."""
    lease = Path(cache_dir) / READERS / _lease_name()
    try:
        lease.parent.mkdir(exist_ok=True)
        lease.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    except OSError:  # read-only mount: nobody here can delete it either
        lease = None
    try:
        yield lease
    finally:
        if lease is not None:
            lease.unlink(missing_ok=True)


def _lease_alive(name: str) -> bool:
    """A lease of another host cannot be checked and counts as alive; one of this host lives while its pid does."""
    pid, _, rest = name.partition("@")
    host = rest.rsplit("-", 1)[0]
    if not pid.isdigit() or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def active_readers(cache_dir) -> list[str]:
    """Names of the live leases on a cache (`<pid>@<host>-<token>`)."""
    directory = Path(cache_dir) / READERS
    if not directory.is_dir():
        return []
    return sorted(lease.name for lease in directory.iterdir() if _lease_alive(lease.name))


@contextmanager
def incoming_dir(cache_root):
    """A private scratch directory inside the cache root (same filesystem, so the final rename is atomic)."""
    path = Path(cache_root) / INCOMING / _lease_name()
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- pack
@dataclass
class PackInfo:
    """One entry of a remote's index.json, describing one pack."""
    dataset: str
    agent: str
    fingerprint: str
    rows: int
    bytes: int
    sha256: str
    schema_version: int
    checksums_sha256: str        # hash of the manifest's checksums: equal caches have equal values
    created: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def checksums_digest(manifest: dict) -> str:
    """Content identity of a complete cache: the hash of its per-file checksums (timestamps excluded)."""
    return hashlib.sha256(canonical_json(manifest.get("checksums", {})).encode()).hexdigest()


def pack_members(cache_dir) -> list[str]:
    """Paths (relative, POSIX) that a pack holds: manifest first, then every directory and file sorted,
    without temporary files and reader leases."""
    cache_dir = Path(cache_dir)
    found = []
    for directory, dirnames, filenames in os.walk(cache_dir):
        base = Path(directory)
        dirnames[:] = sorted(d for d in dirnames if not d.endswith(".tmp") and
                             not (base == cache_dir and d == READERS))
        for name in dirnames + filenames:
            if name.endswith(".tmp"):
                continue
            relative = (base / name).relative_to(cache_dir).as_posix()
            if relative != MANIFEST:
                found.append(relative)
    return [MANIFEST] + sorted(found)


def pack_cache(cache_dir, out, callback=None) -> PackInfo:
    """Write a complete cache as one deterministic tar. Every checksummed file is hashed while it is copied;
    a mismatch aborts and leaves no pack behind. `callback` (fsspec's `set_size`/`relative_update`) follows
    the bytes copied."""
    cache_dir, out = Path(cache_dir), Path(out)
    manifest = _complete_manifest(cache_dir)
    members = pack_members(cache_dir)
    if callback is not None:
        callback.set_size(sum(p.stat().st_size for p in (cache_dir / m for m in members) if p.is_file()))
    fp = cache_dir.name
    checksums = manifest["checksums"]
    temporary = out.with_name(out.name + ".tmp")
    try:
        with open(temporary, "wb") as raw:
            sink = _HashingWriter(raw)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.addfile(_tar_info(fp, is_dir=True))
                for relative in members:
                    path = cache_dir / relative
                    if path.is_symlink() or not (path.is_file() or path.is_dir()):
                        raise CacheError(f"{path}: a cache holds only plain files and directories")
                    if path.is_dir():
                        tar.addfile(_tar_info(f"{fp}/{relative}", is_dir=True))
                        continue
                    with open(path, "rb") as handle:
                        source = _HashingReader(handle, callback)
                        tar.addfile(_tar_info(f"{fp}/{relative}", size=os.fstat(handle.fileno()).st_size), source)
                    if relative in checksums and source.hexdigest() != checksums[relative]:
                        raise CorruptCacheError(f"{cache_dir}: checksum mismatch in {relative}; "
                                                "refusing to pack a damaged cache (`transagent cache verify`)")
            size, digest = sink.size, sink.hexdigest()
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return PackInfo(dataset=manifest["dataset"], agent=manifest["agent"], fingerprint=fp, rows=manifest["rows"],
                    bytes=size, sha256=digest, schema_version=manifest["schema_version"],
                    checksums_sha256=checksums_digest(manifest), created=manifest.get("created", {}))


def _complete_manifest(cache_dir: Path) -> dict:
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST}; not a cache directory")
    manifest = read_json(manifest_path)
    check_schema(manifest, manifest_path)
    if manifest.get("status") != "complete":
        raise PartialCacheError(f"{cache_dir} is partial; finish it (`transagent extract` with the same options) "
                                "before packing or merging it")
    if manifest.get("fingerprint") != cache_dir.name:
        raise CorruptCacheError(f"{cache_dir}: directory name differs from the manifest fingerprint "
                                f"{manifest.get('fingerprint')}")
    return manifest


def _tar_info(name: str, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = 0o755 if is_dir else 0o644
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


class _HashingReader:
    def __init__(self, handle, callback=None):
        self._handle, self._digest, self._callback = handle, hashlib.sha256(), callback

    def read(self, size=-1):
        data = self._handle.read(size)
        self._digest.update(data)
        if self._callback is not None:
            self._callback.relative_update(len(data))
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _HashingWriter:
    def __init__(self, handle):
        self._handle, self._digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


# ---------------------------------------------------------------------------------------------- unpack / install
def unpack(pack_path, destination) -> Path:
    """Extract a pack into `destination` (an empty directory) and return `destination/<fingerprint>`.

    Only plain files and directories under one top-level directory are accepted: absolute names, `..`, links,
    devices and duplicate members are refused, so a pack can write nowhere else.
    """
    pack_path, destination = Path(pack_path), Path(destination)
    top, seen = None, set()
    try:
        with tarfile.open(pack_path, mode="r:") as tar:
            for member in tar:
                parts = _member_parts(pack_path, member)
                if top is None:
                    top = parts[0]
                elif parts[0] != top:
                    raise CorruptCacheError(f"{pack_path}: member {member.name!r} is outside {top}/; "
                                            "a pack holds exactly one cache")
                if member.name in seen:
                    raise CorruptCacheError(f"{pack_path}: member {member.name!r} appears twice")
                seen.add(member.name)
                target = destination.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "xb") as sink:
                    shutil.copyfileobj(source, sink, _CHUNK)
    except (tarfile.TarError, EOFError) as error:
        raise CorruptCacheError(f"{pack_path}: truncated or not a cache pack ({error})") from None
    except OSError as error:  # e.g. a member that is both a file and a directory, or a full disk
        raise CacheError(f"{pack_path}: cannot unpack into {destination} ({error})") from None
    if top is None:
        raise CorruptCacheError(f"{pack_path}: empty pack")
    return destination / top


def _member_parts(pack_path: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    if not (member.isfile() or member.isdir()):
        raise CorruptCacheError(f"{pack_path}: member {member.name!r} is a link or special file; refused")
    name = PurePosixPath(member.name)
    if name.is_absolute() or not name.parts or any(part in ("..", "") for part in name.parts) or "\\" in member.name:
        raise CorruptCacheError(f"{pack_path}: member {member.name!r} would leave the cache directory; refused")
    return tuple(part for part in name.parts if part != ".")


@dataclass
class Installed:
    path: Path
    status: str          # "installed" | "present" (an identical complete cache was already there)


def install_pack(pack_path, cache_root, expected: dict | None = None) -> Installed:
    """Verify a pack fully and make it visible at `<cache_root>/<dataset>/<agent>/<fingerprint>/`, atomically.

    `expected` (an index entry) adds checks before anything is unpacked: the pack's sha256, and afterwards its
    dataset, agent and fingerprint. Errors name what failed: the pack, the schema versions, the altered file.
    """
    pack_path, cache_root = Path(pack_path), Path(cache_root)
    expected = expected or {}
    if "schema_version" in expected and expected["schema_version"] != SCHEMA_VERSION:
        raise _schema_error(pack_path, expected["schema_version"])
    with incoming_dir(cache_root) as scratch:
        if "sha256" in expected:
            actual = sha256_file(pack_path)
            if actual != expected["sha256"]:
                raise CorruptCacheError(
                    f"{pack_path.name}: sha256 {actual[:12]}... differs from {expected['sha256'][:12]}... in "
                    f"index.json (truncated or altered){_diagnose(pack_path, scratch / 'diagnose')}")
        unpacked = unpack(pack_path, scratch / "unpacked")
        manifest_path = unpacked / MANIFEST
        if not manifest_path.is_file():
            raise CorruptCacheError(f"{pack_path}: no {MANIFEST} inside")
        manifest = read_json(manifest_path)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise _schema_error(pack_path, manifest.get("schema_version"))
        for name in ("dataset", "agent", "fingerprint"):
            check_name(pack_path, name, manifest.get(name))
            if name in expected and expected[name] != manifest[name]:
                raise CorruptCacheError(f"{pack_path}: index.json says {name} {expected[name]!r}, the pack's "
                                        f"manifest says {manifest[name]!r}")
        problems = verify(unpacked)
        if problems:
            raise CorruptCacheError(f"{pack_path.name}: the unpacked cache fails verification:\n  " +
                                    "\n  ".join(_relative_problem(problem, unpacked) for problem in problems))
        target = cache_root / manifest["dataset"] / manifest["agent"] / manifest["fingerprint"]
        if target.exists():
            return Installed(target, _compare_existing(target, manifest))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(unpacked, target)
        except OSError:
            if target.exists():  # another pull won the race
                return Installed(target, _compare_existing(target, manifest))
            raise
        return Installed(target, "installed")


def _schema_error(pack_path: Path, version) -> CacheError:
    return SchemaVersionError(f"{pack_path.name}: the pack has cache schema version {version}, this code reads "
                              f"version {SCHEMA_VERSION}; use the release that wrote it, or re-extract")


def check_name(where, name: str, value) -> None:
    """Dataset, agent and fingerprint become directory names: no separators, no leading dot."""
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value.startswith("."):
        raise CorruptCacheError(f"{where}: {name} {value!r} is not a valid directory name")


def _relative_problem(problem: str, unpacked: Path) -> str:
    return problem.replace(f"{unpacked}: ", "", 1)


def _diagnose(pack_path: Path, scratch: Path) -> str:
    """Best effort: which files inside a pack with a wrong sha256 are altered."""
    try:
        unpacked = unpack(pack_path, scratch)
        problems = verify(unpacked)
    except CacheError as error:
        return f"; {error}"
    if not problems:
        return "; its files match the manifest (the manifest or a journal itself was changed)"
    return ":\n  " + "\n  ".join(_relative_problem(problem, unpacked) for problem in problems)


def _compare_existing(target: Path, manifest: dict) -> str:
    existing = read_json(target / MANIFEST) if (target / MANIFEST).is_file() else {}
    if existing.get("status") != "complete":
        raise PartialCacheError(f"{target} exists but is partial (an extraction is running or was interrupted); "
                                "finish it, or delete it (`transagent cache gc --apply`), then pull again")
    if existing.get("fingerprint") != manifest["fingerprint"]:
        raise FingerprintMismatch(f"{target}: existing manifest fingerprint {existing.get('fingerprint')} differs "
                                  f"from the pack's {manifest['fingerprint']}")
    if checksums_digest(existing) != checksums_digest(manifest):
        raise CacheError(f"{target} already exists with other rows ({existing.get('rows')} local, "
                         f"{manifest.get('rows')} in the pack); pull into another --cache-root and "
                         "`transagent cache merge` the two")
    return "present"


# ---------------------------------------------------------------------------------------------- merge
@dataclass
class MergeResult:
    added_rows: int
    skipped_rows: int
    added_files: list[str]


def merge(src, dst, batch_rows: int = 64, callback=None) -> MergeResult:
    """Add the rows and files of cache `src` to cache `dst` (same fingerprint). New rows go into a new segment
    after dst's last; rows both hold must be byte-identical (else MergeConflict naming the key). Every check
    happens before dst is touched. A merge killed while copying leaves dst partial (its new segment unfinished):
    `transagent extract` with the cache's options finishes it, or restore dst from its pack. `callback` (fsspec's
    `set_size`/`relative_update`) follows the rows compared and copied."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CacheError(f"cannot merge {src} into itself")
    src_manifest, dst_manifest = _complete_manifest(src), _complete_manifest(dst)
    diff = differing_fields(dst_manifest["fields"], src_manifest["fields"])
    diff += differing_fields(dst_manifest["arrays"], src_manifest["arrays"], "arrays")
    if diff:
        raise FingerprintMismatch(f"cannot merge {src} ({src.name}) into {dst} ({dst.name}): they differ in "
                                  f"{', '.join(diff)}", diff)
    problems = verify(src) + verify(dst)
    if problems:
        raise CorruptCacheError("cannot merge damaged caches:\n  " + "\n  ".join(problems))
    names = tuple(dst_manifest["arrays"])
    source, target = CacheReader(src, memmap_arrays=names), CacheReader(dst, memmap_arrays=names)
    shared = [row for row in source.rows if target.has(row)]
    if callback is not None:
        callback.set_size(len(source.rows))
    for start in range(0, len(shared), batch_rows):
        batch = shared[start:start + batch_rows]
        for name in names:
            mine, theirs = target.read(name, batch), source.read(name, batch)
            for i, row in enumerate(batch):
                if mine[i].tobytes() != theirs[i].tobytes():
                    raise MergeConflict(f"row (key {row[0]!r}, view {row[1]}) of array {name!r} differs between "
                                        f"{src} and {dst}; refusing to overwrite it")
        if callback is not None:
            callback.relative_update(len(batch))
    new_files = _new_files(src, dst)
    new_rows = [row for row in source.rows if not target.has(row)]
    if not new_rows and not new_files:
        return MergeResult(0, len(shared), [])
    cache = AgentCache(dst, dst_manifest)
    plan = cache.plan(new_rows)
    cache.create_segments()
    for segment, local_rows in plan[0]:
        with cache.segment_writer(segment) as writer:
            for start in range(0, len(local_rows), batch_rows):
                local = local_rows[start:start + batch_rows]
                rows = [writer.rows[i] for i in local]
                writer.write(local, {name: source.read(name, rows) for name in names})
                if callback is not None:
                    callback.relative_update(len(local))
    for relative in new_files:
        cache.add_file(relative, (src / FILES / relative).read_bytes())
    merged = cache.manifest.setdefault("provenance", {}).get("merged", [])
    cache.set_provenance("merged", merged + [{"fingerprint": src.name, "created": src_manifest.get("created"),
                                              "rows_added": len(new_rows), "files_added": new_files}])
    cache.finalize()
    return MergeResult(len(new_rows), len(shared), new_files)


def _new_files(src: Path, dst: Path) -> list[str]:
    """Extra files of src that dst lacks; a file both have must be identical."""
    new = []
    for path in sorted((src / FILES).rglob("*")) if (src / FILES).is_dir() else []:
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        relative = path.relative_to(src / FILES).as_posix()
        other = dst / FILES / relative
        if not other.exists():
            new.append(relative)
        elif sha256_file(other) != sha256_file(path):
            raise MergeConflict(f"file {FILES}/{relative} differs between {src} and {dst}; refusing to overwrite it")
    return new


# ---------------------------------------------------------------------------------------------- listing and gc
def disk_usage(path) -> int:
    """Bytes allocated on disk (sparse files count what they use)."""
    total = 0
    for directory, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total


def summary(path, manifest: dict) -> dict:
    """What `cache ls` shows for one cache. Partial caches count the rows their journals mark done."""
    path = Path(path)
    status = manifest.get("status", "unreadable")
    rows = []
    try:
        if status == "complete":
            rows = read_json(path / ROWS)
        elif status == "partial":
            rows = sorted(AgentCache(path, manifest).done_rows())
    except (CacheError, OSError, KeyError):
        status = "damaged"
    created = manifest.get("created", {})
    return {"dataset": path.parent.parent.name, "agent": path.parent.name, "fingerprint": path.name,
            "rows": len(rows), "views": 1 + max((int(view) for _, view in rows), default=-1),
            "bytes": disk_usage(path), "status": status, "created_by": created.get("by", "?"),
            "created_at": created.get("at", "?")}


@dataclass
class GcCandidate:
    path: Path
    reason: str
    bytes: int
    readers: list[str]      # live leases: such a cache is kept

    @property
    def in_use(self) -> bool:
        return bool(self.readers)


def referenced_caches(cache_root, runs_root) -> set[str] | None:
    """Cache directories (relative to the cache root, POSIX) named by runs' config.json `caches` (a list of
    paths, or {agent: path}); None when no run lists any (then only partial caches are garbage)."""
    runs_root, cache_root = Path(runs_root), Path(cache_root).resolve()
    found, any_run = set(), False
    for config in sorted(runs_root.rglob("config.json")) if runs_root.is_dir() else []:
        try:
            caches = json.loads(config.read_text()).get("caches")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if caches is None:
            continue
        any_run = True
        for entry in caches.values() if isinstance(caches, dict) else caches:
            entry = Path(entry)
            if entry.is_absolute():
                try:
                    entry = entry.resolve().relative_to(cache_root)
                except ValueError:
                    continue
            found.add(entry.as_posix())
    return found if any_run else None


def gc_candidates(cache_root, runs_root) -> list[GcCandidate]:
    """Partial caches, caches no run references, and leftovers of interrupted pulls or gc runs."""
    cache_root = Path(cache_root)
    referenced = referenced_caches(cache_root, runs_root)
    candidates = []
    for path, manifest in list_caches(cache_root):
        status = manifest.get("status")
        if status != "complete":
            reason = f"{status or 'unknown'} cache"
        elif referenced is not None and path.relative_to(cache_root).as_posix() not in referenced:
            reason = "not referenced by any run"
        else:
            continue
        candidates.append(GcCandidate(path, reason, disk_usage(path), active_readers(path)))
    leftovers = [(path, "leftover of an interrupted pull or push")
                 for pattern in (f"{INCOMING}/*", f"*/*/{INCOMING}/*")
                 for path in sorted(cache_root.glob(pattern)) if not _lease_alive(path.name)]
    leftovers += [(path, "leftover of an interrupted gc") for path in sorted(cache_root.glob(f"{TRASH}/*"))]
    candidates += [GcCandidate(path, reason, disk_usage(path), []) for path, reason in leftovers]
    return candidates


def remove_cache(path, cache_root) -> bool:
    """Delete a cache unless it has a live lease. It is first renamed into `.trash/` (so no new reader can open
    it) and the leases are checked again there; returns False (and puts it back) if one appeared."""
    path, cache_root = Path(path), Path(cache_root)
    if path.parent.name in (INCOMING, TRASH):
        shutil.rmtree(path, ignore_errors=True)  # a leftover, not a cache
        return True
    if active_readers(path):
        return False
    trash = cache_root / TRASH / _lease_name()
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, trash)
    if active_readers(trash):
        os.rename(trash, path)
        return False
    shutil.rmtree(trash)
    for parent in (path.parent, path.parent.parent):  # drop emptied <agent>/ and <dataset>/ directories
        if parent != cache_root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return True

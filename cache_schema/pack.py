"""Moving caches between machines and people: pack, install, merge, and garbage collection.

A pack is one uncompressed tar per agent cache, members named `<fingerprint>/...`, written deterministically
(manifest first, then every other path sorted; mtime 0, uid/gid 0, fixed modes), so two packs of the same cache are
byte-identical and a pack's sha256 names its content. Nothing in a cache or a pack is ever a pickle.

Installing a pack (`install_pack`) checks every member before unpacking into `<cache_root>/.incoming/` (no links,
no paths that leave the pack, no sparse files, nothing the manifest does not list, room on the disk), then the
schema version, the manifest's dataset and agent against its fields, and every checksum, and only then renames the
directory to `<cache_root>/<dataset>/<agent>/<fingerprint>/`: a damaged pack never becomes visible. What anchors a
pulled pack is the sha256 in the remote's index; the checksums inside catch accidents and careless edits.

A process that uses a cache holds a lease, `with reading(cache_dir): ...` (a file `.readers/<pid>@<host>-<token>`);
`gc` never deletes a cache with a live lease. A process that changes a cache (merge, install, gc) holds its writer
lock (`cache_schema.lock`), as an extraction does.
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
from cache_schema.lock import current_holder, writer_lock
from cache_schema.store import (FILES, MANIFEST, READABLE_SCHEMAS, ROWS, SEGMENTS, AgentCache, CacheReader,
                                check_manifest, list_caches, parse_json, parse_rows, read_json, read_manifest,
                                schema_1_allowance, verify)

PACK_EXT = ".tar"
READERS = ".readers"
INCOMING = ".incoming"   # pulls in progress: <cache_root>/.incoming/<lease>/... (never matched by list_caches)
TRASH = ".trash"         # caches being deleted by gc: renamed here first, then removed
_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 30   # a manifest lists one checksum per file: ~40 MB for 100,000 zarr rows


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


def pack_members(cache_dir, manifest: dict) -> list[str]:
    """Paths (relative, POSIX) that a pack holds: the manifest first, then the files its checksums list (for a
    schema-1 cache also the unlisted journals and zarr group metadata it has) and their directories, sorted.
    Nothing else of the directory (leases, the writer lock, temporaries, stray files) is packed."""
    cache_dir = Path(cache_dir)
    files = set(manifest["checksums"]) | {f for f in schema_1_allowance(manifest) if (cache_dir / f).is_file()}
    return [MANIFEST] + sorted(files | _directories_of(files))


def _directories_of(files) -> set[str]:
    return {"/".join(f.split("/")[:i]) for f in files for i in range(1, f.count("/") + 1)}


def pack_cache(cache_dir, out, callback=None) -> PackInfo:
    """Write a complete cache as one deterministic tar. Every checksummed file is hashed while it is copied;
    a mismatch aborts and leaves no pack behind. `callback` (fsspec's `set_size`/`relative_update`) follows
    the bytes copied."""
    cache_dir, out = Path(cache_dir), Path(out)
    if out.is_dir():
        raise CacheError(f"{out} is a directory; a pack is written to a file, e.g. "
                         f"{out / (cache_dir.name + PACK_EXT)}")
    manifest = _complete_manifest(cache_dir)
    members = pack_members(cache_dir, manifest)
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
                    if not (path.exists() or path.is_symlink()):
                        raise CorruptCacheError(f"{cache_dir}: {relative} is listed in the manifest but missing; "
                                                "refusing to pack a damaged cache (`transagent cache verify`)")
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
    manifest = read_manifest(manifest_path)
    if manifest.get("status") != "complete":
        raise PartialCacheError(f"{cache_dir} is partial; finish it (`transagent extract` with the same options) "
                                "before packing or merging it")
    if manifest.get("fingerprint") != cache_dir.name:
        raise CorruptCacheError(f"{cache_dir}: the directory's name {cache_dir.name} differs from the manifest's "
                                f"fingerprint {manifest.get('fingerprint')}")
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

    Every member is checked before a byte is written: only plain files and directories under one top-level
    directory (absolute names, `..`, links, devices, sparse files and duplicate members are refused), only the
    manifest and the files its checksums list (for schema 1, also its allowance), no member reaching past the end
    of the pack, and room for all of it on the disk. So a pack writes nowhere else and at most its own size.
    """
    pack_path, destination = Path(pack_path), Path(destination)
    try:
        with tarfile.open(pack_path, mode="r:") as tar:
            members = tar.getmembers()   # headers only
            top = _check_members(pack_path, members)
            manifest = _packed_manifest(pack_path, tar, members, top)
            _check_listed(pack_path, members, manifest)
            _check_free_space(pack_path, members, destination)
            for member in members:
                target = destination.joinpath(*_member_parts(pack_path, member))
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
    return destination / top


def _check_members(pack_path: Path, members: list[tarfile.TarInfo]) -> str:
    """The pack's one top-level directory, after checking every member's type, name and extent."""
    top, seen = None, set()
    pack_size = pack_path.stat().st_size
    for member in members:
        parts = _member_parts(pack_path, member)
        if top is None:
            top = parts[0]
        elif parts[0] != top:
            raise CorruptCacheError(f"{pack_path}: member {member.name!r} is outside {top}/; "
                                    "a pack holds exactly one cache")
        if parts in seen:
            raise CorruptCacheError(f"{pack_path}: member {member.name!r} appears twice")
        seen.add(parts)
        if member.issparse() or any(key.startswith("GNU.sparse") for key in member.pax_headers):
            raise CorruptCacheError(f"{pack_path}: member {member.name!r} is a sparse file (it would unpack to more "
                                    "bytes than the pack holds); refused")
        if member.isfile() and member.offset_data + member.size > pack_size:
            raise CorruptCacheError(f"{pack_path}: member {member.name!r} reaches past the end of the pack "
                                    f"({pack_size} bytes); truncated or not a cache pack")
    if top is None:
        raise CorruptCacheError(f"{pack_path}: empty pack")
    return top


def _packed_manifest(pack_path: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo], top: str) -> dict:
    where = f"{pack_path}: {top}/{MANIFEST}"
    member = next((m for m in members if _member_parts(pack_path, m) == (top, MANIFEST)), None)
    if member is None or not member.isfile():
        raise CorruptCacheError(f"{pack_path}: no {MANIFEST} inside")
    if member.size > MAX_MANIFEST_BYTES:
        raise CorruptCacheError(f"{where} has {member.size} bytes; not a cache manifest")
    with tar.extractfile(member) as handle:
        manifest = check_manifest(parse_json(handle.read(), where), where)
    if manifest["status"] != "complete":
        raise PartialCacheError(f"{where}: the packed cache is partial; only complete caches are shared")
    return manifest


def _check_listed(pack_path: Path, members: list[tarfile.TarInfo], manifest: dict) -> None:
    """Refuse any member but the manifest, the files its checksums list (+ a schema-1 cache's allowance) and their
    directories: an unlisted file would become part of the cache unchecked."""
    files = set(manifest["checksums"]) | schema_1_allowance(manifest)
    directories = _directories_of(files) | {"", SEGMENTS, FILES}
    for member in members:
        relative = "/".join(_member_parts(pack_path, member)[1:])
        if not (relative in directories if member.isdir() else relative == MANIFEST or relative in files):
            raise CorruptCacheError(f"{pack_path}: member {member.name!r} is not listed in the manifest's "
                                    "checksums; refused")


def _check_free_space(pack_path: Path, members: list[tarfile.TarInfo], destination: Path) -> None:
    needed = sum(member.size for member in members if member.isfile()) + tarfile.BLOCKSIZE * len(members)
    probe = destination
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CacheError(f"{pack_path}: unpacking needs {_size(needed)}, {probe} has {_size(free)} free; free space "
                         "(e.g. `transagent cache gc`) and try again")


def _size(size: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000


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


def install_pack(pack_path, cache_root, expected: dict | None = None, wait: float = 0.0) -> Installed:
    """Verify a pack fully and make it visible at `<cache_root>/<dataset>/<agent>/<fingerprint>/`, atomically.

    `expected` (an index entry) adds checks before anything is unpacked: the pack's sha256, and afterwards its
    dataset, agent and fingerprint. Errors name what failed: the pack, the schema versions, the altered file.
    An existing cache there is compared under its writer lock (`wait` seconds for it), so never mid-write.
    """
    pack_path, cache_root = Path(pack_path), Path(cache_root)
    expected = expected or {}
    if "schema_version" in expected and expected["schema_version"] not in READABLE_SCHEMAS:
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
        manifest = read_manifest(manifest_path)
        for name in ("dataset", "agent", "fingerprint"):
            check_name(pack_path, name, manifest.get(name))
            if name in expected and expected[name] != manifest[name]:
                raise CorruptCacheError(f"{pack_path}: index.json says {name} {expected[name]!r}, the pack's "
                                        f"manifest says {manifest[name]!r}")
        for name in ("dataset", "agent"):
            part = manifest["fields"].get(name)
            declared = part.get("name") if isinstance(part, dict) else None
            if declared != manifest[name]:
                raise CorruptCacheError(f"{pack_path}: the pack's manifest says {name} {manifest[name]!r}, its fields "
                                        f"(which the fingerprint hashes) say {declared!r}; refused: it would be "
                                        f"installed under another {name}'s directory")
        problems = verify(unpacked)
        if problems:
            raise CorruptCacheError(f"{pack_path.name}: the unpacked cache fails verification:\n  " +
                                    "\n  ".join(_relative_problem(problem, unpacked) for problem in problems))
        target = cache_root / manifest["dataset"] / manifest["agent"] / manifest["fingerprint"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(unpacked, target)   # atomic, and refused once a writer has put anything there
                return Installed(target, "installed")
            except OSError:
                if not target.exists():
                    raise
        with writer_lock(target, wait, purpose="install", create=False):   # another pull or a writer was first
            return Installed(target, _compare_existing(target, manifest))


def _schema_error(pack_path: Path, version) -> CacheError:
    readable = " and ".join(map(str, READABLE_SCHEMAS))
    return SchemaVersionError(f"{pack_path.name}: the pack has cache schema version {version!r}, this code reads "
                              f"versions {readable}; use the release that wrote it, or re-extract")


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
        return "; its files match the manifest (the manifest itself was changed)"
    return ":\n  " + "\n  ".join(_relative_problem(problem, unpacked) for problem in problems)


def _compare_existing(target: Path, manifest: dict) -> str:
    existing = read_manifest(target / MANIFEST) if (target / MANIFEST).is_file() else {}
    if existing.get("status") != "complete":
        raise PartialCacheError(f"{target} exists but is partial (an extraction is running or was interrupted); "
                                "finish it, or delete it (`transagent cache gc --apply`), then pull again")
    check_same_commit(existing, manifest, str(target), "the pack")
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


def merge(src, dst, batch_rows: int = 64, wait: float = 0.0, callback=None) -> MergeResult:
    """Add the rows and files of cache `src` to cache `dst` (same fingerprint). New rows go into a new segment
    after dst's last; rows both hold must be byte-identical (else MergeConflict naming the key). Every check
    happens before dst is touched, under dst's writer lock (`wait` seconds for it). A merge killed while copying
    leaves dst partial (its new segment unfinished): `transagent extract` with the cache's options finishes it, or
    restore dst from its pack. `callback` (fsspec's `set_size`/`relative_update`) follows the rows compared and
    copied."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CacheError(f"cannot merge {src} into itself")
    if not (dst / MANIFEST).is_file():
        raise CacheError(f"{dst}: no {MANIFEST}; not a cache directory")
    with writer_lock(dst, wait, purpose=f"merge from {src.name}", create=False) as lock:
        return _merge_locked(src, dst, batch_rows, lock.check, callback)


def _merge_locked(src: Path, dst: Path, batch_rows: int, still_ours, callback=None) -> MergeResult:
    src_manifest, dst_manifest = _complete_manifest(src), _complete_manifest(dst)
    diff = differing_fields(dst_manifest["fields"], src_manifest["fields"])
    diff += differing_fields(dst_manifest["arrays"], src_manifest["arrays"], "arrays")
    if diff:
        raise FingerprintMismatch(f"cannot merge {src} ({src.name}) into {dst} ({dst.name}): they differ in "
                                  f"{', '.join(diff)}", diff)
    check_same_commit(dst_manifest, src_manifest, str(dst), str(src))
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
    new_files = _new_files(src, dst, src_manifest)
    new_rows = [row for row in source.rows if not target.has(row)]
    if not new_rows and not new_files:
        return MergeResult(0, len(shared), [])
    cache = AgentCache(dst, dst_manifest)
    plan = cache.plan(new_rows)
    cache.create_segments(verify_existing=False)   # dst was verified above
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
    still_ours()
    cache.finalize()
    return MergeResult(len(new_rows), len(shared), new_files)


def resolved_commit(manifest: dict) -> str | None:
    """The hub commit a cache's rows were computed from; None for local or tiny weights (their content is in the
    fingerprint) and for caches that did not record one."""
    provenance = manifest.get("provenance") or {}
    source = provenance.get("source")
    return provenance.get("resolved_revision") or (source.get("commit") if isinstance(source, dict) else None)


def check_same_commit(first: dict, second: dict, first_name: str, second_name: str) -> None:
    """An agent without a pinned revision keeps its fingerprint when the hub's weights change, so rows of two
    resolved commits must never be combined into one cache."""
    a, b = resolved_commit(first), resolved_commit(second)
    if a and b and a != b:
        raise FingerprintMismatch(f"{first_name} was computed from hub commit {a} and {second_name} from {b}: same "
                                  f"fingerprint, other weights; refusing to combine their rows (pin the agent's "
                                  f"revision, or keep them in separate cache roots)", ["provenance.resolved_revision"])


def _new_files(src: Path, dst: Path, src_manifest: dict) -> list[str]:
    """Extra files of src (those its checksums list: nothing unlisted is adopted) that dst lacks; a file both have
    must be identical."""
    new = []
    for listed in sorted(name for name in src_manifest["checksums"] if name.startswith(f"{FILES}/")):
        path = src / listed
        relative = listed[len(FILES) + 1:]
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
            rows = parse_rows(read_json(path / ROWS), path / ROWS)
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
    status: str = ""        # the manifest's status when listed; removal re-checks it
    writer: str = ""        # the live writer lock's holder: such a cache is kept

    @property
    def in_use(self) -> bool:
        return bool(self.readers or self.writer)


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
        writer = current_holder(path)
        candidates.append(GcCandidate(path, reason, disk_usage(path), active_readers(path), status or "",
                                      writer.describe() if writer else ""))
    leftovers = [(path, "leftover of an interrupted pull or push")
                 for pattern in (f"{INCOMING}/*", f"*/*/{INCOMING}/*")
                 for path in sorted(cache_root.glob(pattern)) if not _lease_alive(path.name)]
    leftovers += [(path, "leftover of an interrupted gc") for path in sorted(cache_root.glob(f"{TRASH}/*"))]
    candidates += [GcCandidate(path, reason, disk_usage(path), []) for path, reason in leftovers]
    return candidates


def remove_cache(path, cache_root, status: str | None = None, wait: float = 0.0) -> bool:
    """Delete a cache unless it has a live lease or a writer. Under its writer lock (a held one raises
    WriterLocked, after `wait` seconds), the status must still be `status` (the one it was chosen for: a partial
    cache that has just become complete is kept); it is then renamed into `.trash/` (so no new reader can open
    it) and the leases are checked again there; returns False (and puts it back) if one appeared."""
    path, cache_root = Path(path), Path(cache_root)
    if path.parent.name in (INCOMING, TRASH):
        shutil.rmtree(path, ignore_errors=True)  # a leftover, not a cache
        return True
    if not path.is_dir():
        return False
    with writer_lock(path, wait, purpose="gc", create=False):
        if status is not None and _status(path) != status:
            return False
        return _remove_unread(path, cache_root)


def _status(path: Path) -> str:
    try:
        manifest = read_json(path / MANIFEST)
    except (CacheError, OSError):
        return "unreadable"
    return str(manifest.get("status", "")) if isinstance(manifest, dict) else "unreadable"


def _remove_unread(path: Path, cache_root: Path) -> bool:
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

"""Packs: one complete cache as one deterministic tar, and unpacking one safely.

A pack is one uncompressed tar per agent cache, members named `<fingerprint>/...`, written deterministically
(manifest first, then every other path sorted; mtime 0, uid/gid 0, fixed modes), so two packs of the same cache are
byte-identical and a pack's sha256 names its content. Nothing in a cache or a pack is ever a pickle.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cache_schema.errors import CacheError, ChecksumMismatch, CorruptCacheError, NoSpaceError, PartialCacheError
from cache_schema.fingerprint import canonical_json
from cache_schema.layout import FILES, MANIFEST, SEGMENTS, parse_json, schema_1_allowance
from cache_schema.manifest import check_manifest, complete_manifest


PACK_EXT = ".tar"
_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 30   # a manifest lists one checksum per file: ~40 MB for 100,000 zarr rows


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
    manifest = complete_manifest(cache_dir)
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
                        raise ChecksumMismatch(f"{cache_dir}: {relative} is listed in the manifest but missing; "
                                               "refusing to pack a damaged cache")
                    if path.is_symlink() or not (path.is_file() or path.is_dir()):
                        raise CacheError(f"{path}: a cache holds only plain files and directories")
                    if path.is_dir():
                        tar.addfile(_tar_info(f"{fp}/{relative}", is_dir=True))
                        continue
                    with open(path, "rb") as handle:
                        source = _HashingReader(handle, callback)
                        tar.addfile(_tar_info(f"{fp}/{relative}", size=os.fstat(handle.fileno()).st_size), source)
                    if relative in checksums and source.hexdigest() != checksums[relative]:
                        raise ChecksumMismatch(f"{cache_dir}: checksum mismatch in {relative}; "
                                               "refusing to pack a damaged cache")
            size, digest = sink.size, sink.hexdigest()
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    return PackInfo(dataset=manifest["dataset"], agent=manifest["agent"], fingerprint=fp, rows=manifest["rows"],
                    bytes=size, sha256=digest, schema_version=manifest["schema_version"],
                    checksums_sha256=checksums_digest(manifest), created=manifest.get("created", {}))


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
        raise NoSpaceError(f"{pack_path}: unpacking needs {_size(needed)}, {probe} has {_size(free)} free; free "
                           "space and try again")


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

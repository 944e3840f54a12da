"""Installing a pack into a cache root, atomically.

Installing a pack (`install_pack`) checks every member before unpacking into `<cache_root>/.incoming/` (no links,
no paths that leave the pack, no sparse files, nothing the manifest does not list, room on the disk), then the
schema version, the manifest's dataset and agent against its fields, and every checksum, and only then renames the
directory to `<cache_root>/<dataset>/<agent>/<fingerprint>/`: a damaged pack never becomes visible. What anchors a
pulled pack is the sha256 in the remote's index; the checksums inside catch accidents and careless edits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cache_schema.catalogue import verify
from cache_schema.errors import (CacheError, CorruptCacheError, DivergedCacheError, FingerprintMismatch,
                                 PartialCacheError, SchemaVersionError)
from cache_schema.fingerprint import sha256_file
from cache_schema.layout import MANIFEST, READABLE_SCHEMAS
from cache_schema.leases import incoming_dir
from cache_schema.lock import writer_lock
from cache_schema.manifest import check_same_commit, read_manifest
from cache_schema.pack import checksums_digest, unpack


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
                                "finish or delete it, then pull again")
    check_same_commit(existing, manifest, str(target), "the pack")
    if existing.get("fingerprint") != manifest["fingerprint"]:
        raise FingerprintMismatch(f"{target}: existing manifest fingerprint {existing.get('fingerprint')} differs "
                                  f"from the pack's {manifest['fingerprint']}")
    if checksums_digest(existing) != checksums_digest(manifest):
        raise DivergedCacheError(f"{target} already exists with other rows ({existing.get('rows')} local, "
                                 f"{manifest.get('rows')} in the pack); pull into another cache root and merge the "
                                 "two")
    return "present"

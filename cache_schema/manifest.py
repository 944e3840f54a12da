"""A cache's manifest: the checks every reader relies on (schema version, shape), and `Manifest`, the typed view
stage 2 reads a complete cache's fields through."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cache_schema.arrays import DTYPES, ArraySpec
from cache_schema.backends import BACKENDS
from cache_schema.errors import (CorruptCacheError, FingerprintMismatch, NoCacheError, PartialCacheError,
                                 SchemaVersionError)
from cache_schema.layout import (ARRAY_NAME, MANIFEST, READABLE_SCHEMAS, SHA256, is_inside, is_int, kind_name,
                                 read_json, valid_segment_name)
from cache_schema.views import ViewSpec

_ABSENT = object()


def manifest_problem(manifest) -> str | None:
    """What makes this JSON value unusable as a manifest (None: nothing); the schema version is checked apart."""
    if not isinstance(manifest, dict):
        return f"it is {kind_name(manifest)}, not an object"
    kinds = (("dataset", str), ("agent", str), ("fingerprint", str), ("fields", dict), ("arrays", dict),
             ("backend", str), ("status", str), ("segments", list), ("rows", int), ("checksums", dict))
    for key, kind in kinds:
        if key not in manifest:
            return f"field {key!r} is missing"
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and not is_int(value)):
            return f"field {key!r} is {kind_name(value)}, not {kind_name(kind())}"
    if manifest["backend"] not in BACKENDS:
        return f"backend {manifest['backend']!r} is not one of {', '.join(BACKENDS)}"
    if manifest["status"] not in ("partial", "complete"):
        return f"status {manifest['status']!r} is neither 'partial' nor 'complete'"
    for name, spec in manifest["arrays"].items():
        if not ARRAY_NAME.fullmatch(name):
            return f"array name {name!r} is not a plain name"
        if not (isinstance(spec, dict) and spec.get("dtype") in DTYPES and isinstance(spec.get("row_shape"), list)
                and all(is_int(d) and d >= 0 for d in spec["row_shape"])):
            return f"arrays.{name} is {spec!r}, not {{row_shape: [sizes], dtype: one of {', '.join(DTYPES)}}}"
    names = set()
    for i, segment in enumerate(manifest["segments"]):
        if not (isinstance(segment, dict) and valid_segment_name(segment.get("name")) and
                is_int(segment.get("rows")) and segment["rows"] >= 0):
            return f"segments[{i}] is {segment!r}, not {{name: 'seg-NNNNN', rows: count}}"
        if segment["name"] in names:
            return f"segment {segment['name']} is listed twice"
        names.add(segment["name"])
    if manifest["rows"] < 0:
        return f"rows is {manifest['rows']}"
    for relative, digest in manifest["checksums"].items():
        if not is_inside(relative):
            return f"checksums name {relative!r}, which is not a path inside the cache"
        if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
            return f"checksums[{relative!r}] is {digest!r}, not a sha256 hex digest"
    return None


def check_manifest(manifest, where, versions=READABLE_SCHEMAS) -> dict:
    """The manifest if its schema version is one of `versions` and its shape is what every reader relies on."""
    if not isinstance(manifest, dict):
        raise CorruptCacheError(f"{where}: not a cache manifest (it is {kind_name(manifest)}, not an object)")
    check_schema(manifest, where, versions)
    problem = manifest_problem(manifest)
    if problem:
        raise CorruptCacheError(f"{where}: not a valid cache manifest: {problem}")
    return manifest


def check_schema(manifest: dict, where, versions=READABLE_SCHEMAS) -> None:
    version = manifest.get("schema_version")
    readable = " and ".join(str(v) for v in versions)
    if "schema_version" not in manifest:
        raise SchemaVersionError(f"{where}: no schema_version; not a cache manifest this code reads "
                                 f"(cache schema {readable})")
    if not is_int(version):
        raise SchemaVersionError(f"{where}: schema_version is {version!r} ({kind_name(version)}); it must be an "
                                 f"integer (this code reads cache schema {readable})")
    if version not in versions:
        raise SchemaVersionError(f"{where}: cache schema version {version}, this code reads {readable}; "
                                 "re-extract, or use the release that wrote it")


def read_manifest(path: Path, versions=READABLE_SCHEMAS) -> dict:
    return check_manifest(read_json(path), path, versions)


def complete_manifest(cache_dir: Path) -> dict:
    manifest_path = cache_dir / MANIFEST
    if not manifest_path.is_file():
        raise NoCacheError(f"{cache_dir}: no {MANIFEST}; not a cache directory")
    manifest = read_manifest(manifest_path)
    if manifest.get("status") != "complete":
        raise PartialCacheError(f"{cache_dir} is partial; finish it (extract it again with the same options) "
                                "before packing or merging it")
    if manifest.get("fingerprint") != cache_dir.name:
        raise CorruptCacheError(f"{cache_dir}: the directory's name {cache_dir.name} differs from the manifest's "
                                f"fingerprint {manifest.get('fingerprint')}")
    return manifest


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


class SegmentEntry(NamedTuple):
    name: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    """A checked manifest as a value: its top-level entries as attributes, and one accessor per entry of the field
    tree that stage 2 reads, each checked on access (a manifest may come from another machine) and raising
    CorruptCacheError that names the entry. The field tree itself is open: stage 1 decides what it hashes."""

    where: str
    schema_version: int
    dataset: str
    agent: str
    fingerprint: str
    status: str
    backend: str
    rows: int
    arrays: dict[str, ArraySpec]
    segments: tuple[SegmentEntry, ...]
    checksums: dict[str, str]
    fields: dict
    provenance: dict
    created: dict

    @classmethod
    def from_dict(cls, data, where, versions=READABLE_SCHEMAS) -> "Manifest":
        check_manifest(data, where, versions)
        for key in ("provenance", "created"):
            if not isinstance(data.get(key, {}), dict):
                raise CorruptCacheError(f"{where}: not a valid cache manifest: field {key!r} is "
                                        f"{kind_name(data[key])}, not an object")
        return cls(where=str(where), schema_version=data["schema_version"], dataset=data["dataset"],
                   agent=data["agent"], fingerprint=data["fingerprint"], status=data["status"],
                   backend=data["backend"], rows=data["rows"],
                   arrays={name: ArraySpec.from_dict(spec) for name, spec in data["arrays"].items()},
                   segments=tuple(SegmentEntry(s["name"], s["rows"]) for s in data["segments"]),
                   checksums=dict(data["checksums"]), fields=data["fields"], provenance=data.get("provenance", {}),
                   created=data.get("created", {}))

    @classmethod
    def read(cls, path, versions=READABLE_SCHEMAS) -> "Manifest":
        return cls.from_dict(read_json(Path(path)), path, versions)

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    # ---------------------------------------------------------------- what stage 2 reads
    @property
    def family(self) -> str:
        """fields.agent.family: which stage-2 loss the rows feed (vision, language, t2i, i2t)."""
        return self._field("agent", "family", kind=str)

    @property
    def embedding_space(self) -> str | None:
        """fields.agent.preprocessing.space: "own" for features in the encoder's own space (not the student's)."""
        return self._field("agent", "preprocessing", "space", kind=str, default=None)

    @property
    def tiny_config(self) -> dict | None:
        """fields.agent.tiny_config: the configuration of a tiny test agent (None for real weights)."""
        return self._field("agent", "tiny_config", kind=dict, default=None)

    @property
    def dataset_fields(self) -> dict:
        """fields.dataset: the dataset's identity (name, split hash, ...)."""
        return self._field("dataset", kind=dict)

    @property
    def view_spec(self) -> ViewSpec:
        """fields.family.view_spec: how the cached views were drawn."""
        spec = self._field("family", "view_spec", kind=dict)
        try:
            return ViewSpec.from_dict(spec)
        except (KeyError, TypeError, ValueError):
            raise CorruptCacheError(f"{self.where}: fields.family.view_spec is {spec!r}, not a view spec") from None

    @property
    def classnames(self) -> list[str] | None:
        """fields.family.classnames: the classes a language or multimodal cache holds, in its order."""
        names = self._field("family", "classnames", kind=list, default=None)
        if names is not None and not all(isinstance(name, str) for name in names):
            raise CorruptCacheError(f"{self.where}: fields.family.classnames is {names!r}, not a list of names")
        return names

    @property
    def class_set(self) -> str | None:
        """fields.family.class_set: the named class set a t2i cache scores."""
        return self._field("family", "class_set", kind=str, default=None)

    @property
    def image_decoding(self) -> int | None:
        """fields.family.image_decoding: the version of the image decoding the rows were computed from, as
        recorded (None where not recorded: caches not made from pixels, and those made before version 2)."""
        return self._field("family", "image_decoding", kind=int, default=None)

    @property
    def stored_layers(self):
        """fields.family.layers as recorded: the agent layers a vision cache stores (None: all), unchecked here;
        stage 2 checks it against `agent_layers` and the tokens array."""
        return self._field("family", "layers", default=None)

    @property
    def agent_layers(self):
        """provenance.agent_layers as recorded ({depth, stored}; None in older caches), unchecked here (see
        `stored_layers`)."""
        return self.provenance.get("agent_layers")

    @property
    def token_layers(self) -> int:
        """The layer axis of the tokens array (arrays.tokens.row_shape[0])."""
        spec = self.arrays.get("tokens")
        if spec is None or not spec.row_shape:
            raise CorruptCacheError(f"{self.where}: arrays.tokens has no layer axis")
        return spec.row_shape[0]

    @property
    def skipped_keys(self) -> tuple[str, ...]:
        """provenance.skipped_keys: the images stage 1 was told to leave out because they could not be read."""
        keys = self.provenance.get("skipped_keys") or []
        if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
            raise CorruptCacheError(f"{self.where}: provenance.skipped_keys is {keys!r}, not a list of keys")
        return tuple(keys)

    def _field(self, *path: str, kind=None, default=_ABSENT):
        value = self.fields
        for depth, key in enumerate(path):
            if not isinstance(value, dict):
                where = ".".join(("fields", *path[:depth]))
                raise CorruptCacheError(f"{self.where}: {where} is {kind_name(value)}, not an object")
            if key not in value:
                if default is _ABSENT:
                    raise CorruptCacheError(f"{self.where}: fields.{'.'.join(path)} is missing")
                return default
            value = value[key]
        if value is None and default is None:
            return None
        if kind is not None and (not isinstance(value, kind) or (kind is int and not is_int(value))):
            raise CorruptCacheError(f"{self.where}: fields.{'.'.join(path)} is {kind_name(value)}, not "
                                    f"{kind_name(kind())}")
        return value

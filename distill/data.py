"""Stage-2 inputs: the student's pixels (rebuilt from cached view parameters) and teacher rows gathered by key.

Teacher caches are opened once per run. Large token arrays stay memory-mapped; class features and score vectors
are loaded into RAM. Rows are looked up by (key, view id) - never by position in a batch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cache_schema import (AmbiguousCacheError, CacheError, CacheReader, MissingRowsError, ViewSpec, apply_view,
                          dequantize_int8, list_caches, select_cache)
from cache_schema.manifest import Manifest
from cache_schema.views import IMAGE_DECODING_VERSION, load_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_FAMILIES = ("vision", "t2i", "i2t")  # families whose rows were computed from decoded pixels
DepthFallback = Callable[[str, Manifest], "int | None"]   # (agent, manifest) -> its block count, for old caches


class VisionLayers(NamedTuple):
    """What a vision cache holds: the agent's block count and the 0-based agent layers stored, in stored order."""

    depth: int
    stored: tuple[int, ...]


class LayerPair(NamedTuple):
    """One L_VAC term: an agent layer, its position in the cached tokens, and the student block it is paired with."""

    agent: int
    stored: int
    student: int


@dataclass
class TeacherBank:
    """The caches of one run, by family. `classnames` is the training class set, in label order."""

    classnames: list[str]
    vision: dict[str, CacheReader] = field(default_factory=dict)
    language: dict[str, np.ndarray] = field(default_factory=dict)   # gpt3/vicuna: [C, D] in the student's space
    relational: dict[str, np.ndarray] = field(default_factory=dict)  # bert: [C, d] in its own space
    multimodal: dict[str, tuple[CacheReader, np.ndarray | None]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    vision_layers: dict[str, VisionLayers] = field(default_factory=dict)

    @property
    def agents(self) -> list[str]:
        return [*self.vision, *self.language, *self.relational, *self.multimodal]

    @property
    def view_spec(self) -> ViewSpec | None:
        for reader in self.vision.values():
            return reader.manifest.view_spec
        return None

    def layer_pairs(self, student_depth: int, chosen=None) -> list[LayerPair]:
        """L_VAC's pairs: each chosen agent layer (default: every stored one) with the student block of the same
        relative depth (the same block when depths are equal). Every vision agent must store the same layers of
        the same depth, since one gate fuses them layer by layer."""
        if not self.vision_layers:
            if chosen is not None:
                raise ValueError(f"--layers {_layer_list(chosen)}: no vision agent in this run to distil layers from")
            return []
        from distill.losses import student_block_for

        layouts = set(self.vision_layers.values())
        if len(layouts) > 1:
            described = "; ".join(f"{name}: depth {v.depth}, layers {list(v.stored)}"
                                  for name, v in self.vision_layers.items())
            raise ValueError(f"the vision caches store different agent layers ({described}); extract them with the "
                             "same --layers or distil them in separate runs")
        depth, stored = layouts.pop()
        chosen = sorted(stored) if chosen is None else sorted({int(layer) for layer in chosen})
        outside = [layer for layer in chosen if layer not in stored]
        if outside or not chosen:
            raise ValueError(f"--layers {_layer_list(chosen)}: the vision caches store agent layers "
                             f"{_layer_list(sorted(stored))} (of {depth}); choose among them or re-extract with "
                             f"--layers {_layer_list(chosen)}")
        return [LayerPair(layer, stored.index(layer), student_block_for(layer, depth, student_depth))
                for layer in chosen]

    # ------------------------------------------------------------------ checks
    def check_rows(self, keys: list[str], views: int, hint: str = "", skipped_hint: str = "") -> None:
        """Fail before training if any teacher lacks a row the run will ask for. Rows of images that
        `extract --on-error skip` left out get `skipped_hint` (how to exclude them), not the extract command again."""
        for name, reader in self.vision.items():
            self._check(name, reader, [(key, view) for key in keys for view in range(views)], hint, skipped_hint)
        for name, (reader, _) in self.multimodal.items():
            self._check(name, reader, [(key, 0) for key in keys], hint, skipped_hint)

    @staticmethod
    def _check(name, reader, rows, hint, skipped_hint=""):
        missing = reader.missing(rows)
        if missing:
            keys = sorted({key for key, _ in missing})
            skipped = sorted(set(keys) & set(reader.manifest.skipped_keys))
            if skipped:
                raise MissingRowsError(
                    f"agent {name!r}: {len(skipped)} training image(s) were left out of its cache by `extract "
                    f"--on-error skip` (unreadable): {', '.join(skipped[:10])}"
                    + (f"\n  {skipped_hint}" if skipped_hint else ""), name, missing)
            raise MissingRowsError(
                f"agent {name!r}: {len(missing)} cached row(s) missing for {len(keys)} image(s), e.g. "
                f"{', '.join(keys[:3])}" + (f"\n  fill them with: {hint}" if hint else ""), name, missing)

    def available_views(self) -> int | None:
        """Views present for every vision agent (None without vision agents)."""
        counts = [1 + max(view for _, view in reader.rows) for reader in self.vision.values() if reader.rows]
        return min(counts) if counts else None

    # ------------------------------------------------------------------ batches
    def vision_batch(self, keys: list[str], views: list[int]) -> tuple[dict, dict]:
        """tokens {agent: [B, L, T, D]} and token means {agent: float32 [B, L, D]}.

        Tokens stay in the cache's 16 bits (int8 caches are dequantised to float16): a batch of four ViT-B/16
        agents is 58 MB instead of 116 MB, and the loss widens one layer at a time."""
        rows = list(zip(keys, views, strict=True))
        tokens, means = {}, {}
        for name, reader in self.vision.items():
            values = reader.read("tokens", rows)
            if "tokens_scale" in reader.arrays:
                values = dequantize_int8(values, reader.read("tokens_scale", rows), dtype=np.float16)
            tokens[name] = values if values.dtype == np.float16 else values.astype(np.float32, copy=False)
            means[name] = reader.read("token_mean", rows).astype(np.float32, copy=False)
        return tokens, means

    def cached_view(self, key: str, view: int) -> np.ndarray | None:
        for reader in self.vision.values():
            return reader.read("views", [(key, view)])[0]
        return None

    def multimodal_batch(self, keys: list[str]) -> dict[str, np.ndarray]:
        """{agent: float32 [B, C]}: t2i scores averaged over resolutions, i2t scores sliced to the class set."""
        rows = [(key, 0) for key in keys]
        out = {}
        for name, (reader, columns) in self.multimodal.items():
            scores = reader.read("scores", rows).astype(np.float32)
            if scores.ndim == 3:  # t2i: [B, R_res, C]
                scores = scores.mean(axis=1)
            out[name] = scores if columns is None else scores[:, columns]
        return out


def open_teachers(cache_root, dataset: str, split_hash: str, agents: list[str], classnames: list[str],
                  class_set: str, pins: dict[str, str] | None = None, hint: str = "",
                  dataset_fields: dict | None = None, depth_fallback: DepthFallback | None = None) -> TeacherBank:
    """Find and open the cache of every agent, checking it belongs to this dataset, split and class set.

    `dataset` is the caches' directory name; `dataset_fields` the dataset's identity in their fingerprints
    (default: that name and the split hash). `depth_fallback` gives the agent's block count for vision caches that
    predate recording it and store a subset of the layers (the caller knows the agent registry; stage 2 does not)."""
    pins = pins or {}
    bank = TeacherBank(list(classnames))
    for name in agents:
        required = {"dataset": dataset_fields or {"name": dataset, "split_hash": split_hash}}
        path = _locate(cache_root, dataset, name, required, pins.get(name), hint, class_set)
        reader = CacheReader(path)
        family = reader.manifest.family
        _check_decoding(name, reader, hint)
        cached_classes = reader.manifest.classnames
        bank.paths[name] = str(path)
        if family == "vision":
            bank.vision[name] = reader
            bank.vision_layers[name] = stored_vision_layers(name, reader.manifest, depth_fallback)
        elif family == "language":
            features = reader.read("class_features", [(c, 0) for c in _check_classes(name, classnames, reader)])
            target = bank.relational if _own_space(reader) else bank.language
            target[name] = features.astype(np.float32)
        elif family == "t2i":
            if list(cached_classes) != list(classnames):
                raise MissingRowsError(f"agent {name!r}: its cache scores classes {cached_classes}, this run trains "
                                       f"on {classnames}; extract the {class_set!r} class set" +
                                       (f"\n  fill it with: {hint}" if hint else ""), name, [])
            bank.multimodal[name] = (reader, None)
        elif family == "i2t":
            bank.multimodal[name] = (reader, np.array([cached_classes.index(c) for c in
                                                       _check_classes(name, classnames, reader, cached_classes)]))
        else:
            raise ValueError(f"agent {name!r}: unknown family {family!r} in {path}")
    return bank


def stored_vision_layers(name: str, manifest: Manifest, depth_fallback: DepthFallback | None = None) -> VisionLayers:
    """The agent depth and stored layer numbers of a vision cache, from its manifest, checked against each other
    and against the tokens array. Stage 1 records them in provenance["agent_layers"]; for older caches the stored
    layers are fields.family.layers (null = all, so the depth is the token array's layer count), and the depth of
    a subset comes from depth_fallback."""
    where = f"agent {name!r} manifest"
    count = manifest.token_layers
    fields_layers = manifest.stored_layers
    if fields_layers is not None:
        fields_layers = _layer_numbers(fields_layers, f"{where}: fields.family.layers")
    recorded = manifest.agent_layers
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise ValueError(f"{where}: provenance.agent_layers must be an object, got {recorded!r}")
        depth = _positive_int(recorded.get("depth"), f"{where}: provenance.agent_layers.depth")
        stored = _layer_numbers(recorded.get("stored"), f"{where}: provenance.agent_layers.stored")
        if fields_layers is not None and stored != fields_layers:
            raise ValueError(f"{where}: provenance.agent_layers.stored {list(stored)} != fields.family.layers "
                             f"{list(fields_layers)}")
    elif fields_layers is None:
        depth, stored = count, tuple(range(count))
    else:
        stored = fields_layers
        depth = depth_fallback(name, manifest) if depth_fallback is not None else None
        if depth is None:
            raise ValueError(f"{where}: the cache stores agent layers {list(stored)} but not the agent's depth; "
                             "re-extract it (stage 1 now records it)")
        depth = _positive_int(depth, f"agent {name!r} depth")
    if len(stored) != count:
        raise ValueError(f"{where}: {len(stored)} stored layer numbers for {count} cached layers (arrays.tokens)")
    if max(stored) >= depth:
        raise ValueError(f"{where}: stored layers {list(stored)} exceed the agent's {depth} blocks")
    return VisionLayers(depth, stored)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _layer_numbers(value, what: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)
            or len(set(value)) != len(value)):
        raise ValueError(f"{what} must be a non-empty list of distinct 0-based layer numbers, got {value!r}")
    return tuple(value)


def _layer_list(layers) -> str:
    return ",".join(str(layer) for layer in layers) or "(none)"


def _own_space(reader: CacheReader) -> bool:
    """Language features in an encoder's own space (not the student's) feed L_REL, not L_LAC."""
    return reader.manifest.embedding_space == "own"


def _check_classes(name, classnames, reader, cached=None):
    cached = cached if cached is not None else [key for key, _ in reader.rows]
    missing = [c for c in classnames if c not in cached]
    if missing:
        raise MissingRowsError(f"agent {name!r}: cache {reader.path} has no entry for classes {missing}", name,
                               [(c, 0) for c in missing])
    return classnames


def _locate(cache_root, dataset, name, required, pin, hint, class_set):
    if pin:
        path = Path(cache_root) / dataset / name / pin
        if not path.exists():
            raise FileNotFoundError(f"pinned cache {path} does not exist")
        return path
    try:
        return select_cache(cache_root, dataset, name, required, hint)
    except AmbiguousCacheError:
        # Several match: t2i agents keep one cache per class set, and caches of an older image decoding stay until
        # `cache gc`. Choose this decoding, then this class set.
        readable = [(path, Manifest.from_dict(data, path)) for path, data in list_caches(cache_root, dataset, name)
                    if "problem" not in data]
        complete = [(path, manifest) for path, manifest in readable if manifest.is_complete
                    and manifest.dataset_fields == {**manifest.dataset_fields, **required["dataset"]}]
        current = [(path, manifest) for path, manifest in complete
                   if _decoding(manifest) in (None, IMAGE_DECODING_VERSION)]
        for matches in (current, [(path, manifest) for path, manifest in current
                                  if manifest.class_set == class_set]):
            if len(matches) == 1:
                return matches[0][0]
        raise


def _decoding(manifest: Manifest) -> int | None:
    """The image decoding a cache's rows were computed with (None: not computed from pixels; absent = 1)."""
    if manifest.family not in IMAGE_FAMILIES:
        return None
    return 1 if manifest.image_decoding is None else manifest.image_decoding


def _check_decoding(name: str, reader: CacheReader, hint: str) -> None:
    version = _decoding(reader.manifest)
    if version not in (None, IMAGE_DECODING_VERSION):
        raise CacheError(f"agent {name!r}: cache {reader.path} was computed from images decoded by version {version}; "
                         f"this code decodes them by version {IMAGE_DECODING_VERSION} (16-bit images scaled, not "
                         "clipped), so its rows would not match the student's pixels; re-extract"
                         + (f"\n  fill it with: {hint}" if hint else ""))


def load_image(image_root, key: str):
    """The image as both stages decode it (`cache_schema.views.decode_rgb`)."""
    return load_rgb(Path(image_root) / key)


def student_pixels(image, params, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """[3, size, size] float32, the student's normalised input for one view."""
    view = np.asarray(apply_view(image, params, size), dtype=np.float32) / 255.0
    return ((view - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)).transpose(2, 0, 1)


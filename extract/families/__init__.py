"""Agent families. Each module here (vision, language, t2i, i2t) turns a loaded agent into cache rows.

A family module exposes:
    rows(ctx) -> list[tuple[str, int]]                 rows this family caches: (key, view id)
    arrays(runtime, ctx) -> dict[str, ArraySpec]        per-row array specs (names = the agent's `emits`)
    compute(runtime, rows, ctx) -> dict[str, ndarray]   one batch of rows, arrays [len(rows), *row_shape]
    fingerprint_fields(ctx) -> dict                    the parts of the context that change this family's numbers
    extra_files(runtime, ctx) -> dict[str, bytes]       files stored beside the arrays (e.g. descriptions.json)
    provenance(runtime, ctx) -> dict (optional)         facts about the loaded model for the manifest's provenance
    prepare(runtime, rows, ctx), finish(arrays, ctx)     (optional, both) the work around the model, by thread:
                                                        prepare makes a batch's inputs on a loader worker,
                                                        compute(runtime, rows, ctx, prepared, stored=False) runs
                                                        the model, finish converts its arrays on the writer's thread
The runner calls only these, so it never branches on agent names. Family and agent modules import torch and
model libraries inside functions only: a complete cache must be recognised without importing them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_schema.student import StudentGrid
from cache_schema.views import ViewSpec


@dataclass
class ExtractContext:
    dataset: str
    image_root: Path                   # keys are POSIX paths relative to this directory
    keys: list[str]                    # images that need rows (sorted, unique)
    classnames: list[str]              # the class set, in label order (t2i: the set the scores softmax over)
    template: str                      # dataset prompt template with one "{}", e.g. "a photo of a {}."
    student: StudentGrid
    split_hash: str = ""               # sha256 of the split file: the identity of the keys
    dataset_fields: dict | None = None  # the dataset's identity in fingerprints (None: name + split hash)
    class_set: str = "all"             # "base" | "all" ... (name of the class set; t2i fingerprints it)
    views: int = 4                     # views per image for vision agents (view 0 = un-augmented)
    view_spec: ViewSpec = field(default_factory=ViewSpec)
    layers: tuple[int, ...] | None = None   # 0-based agent layers to keep; None = all
    token_pool: int = 1                # 1 = student grid; 2 = average-pool 2x2 (14x14 -> 7x7)
    dtype: str = "float16"             # "float16" | "float32" | "int8" (int8 = per-token scale)
    batch_size: int = 16
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)   # agent options, e.g. {"descriptions": path}

    def image_path(self, key: str) -> Path:
        return self.image_root / key

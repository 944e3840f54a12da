"""Stage-2 batches, built whole: the student's pixels and the batch's teacher rows, in the loader's workers.

The dataset's item is a batch: `DataLoader(batch_size=None)` over `EpochOrder`, which hands out the epoch's
(key, view id, label) items a batch at a time, so each teacher row is read once, straight into the batch's
buffer, next to the decoding of its images - no per-sample read and no collate copy. With workers the main
thread only waits for finished batches (pinned on CUDA, so the step copies them with non_blocking=True); with
`workers=0` the same dataset runs in the main thread, as the step used to read its rows itself.

Readers go to spawned workers as their path and reopen there (`ReopeningReader`): open files and memmaps never
travel through a pickle.
"""
from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from cache_schema import CacheError, CacheReader, ViewSpec, view_params
from cache_schema.manifest import Manifest
from distill.data import CLIP_MEAN, CLIP_STD, TeacherBank, load_image, student_pixels

Item = tuple[str, int, int]   # (key, view id, label)


class Batch(NamedTuple):
    pixels: torch.Tensor          # [B, 3, S, S] float32, normalised
    labels: torch.Tensor          # [B] int64
    items: list[Item]
    rows: dict                    # per-batch teacher rows on the host (`teacher_rows`)


def teacher_rows(bank: TeacherBank, keys: list[str], views: list[int]) -> dict:
    """The rows of this batch, as host tensors: vision tokens and token means {agent: [B, ...]} and the
    multi-modal scores {agent: [B, C]}. Class features are the same for every batch: the trainer adds them."""
    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array))

    rows = {}
    if bank.vision:
        tokens, means = bank.vision_batch(keys, views)
        rows["vision_tokens"] = {name: tensor(value) for name, value in tokens.items()}
        rows["vision_token_means"] = {name: tensor(value) for name, value in means.items()}
    if bank.multimodal:
        rows["mm_scores"] = {name: tensor(value) for name, value in bank.multimodal_batch(keys).items()}
    return rows


class StudentBatches(torch.utils.data.Dataset):
    """Indexed by a batch of items: the student's pixels of each (key, view) and the teachers' rows of the batch."""

    def __init__(self, image_root, size: int, view_spec: ViewSpec, bank: TeacherBank, mean=CLIP_MEAN,
                 std=CLIP_STD):
        self.image_root, self.size, self.view_spec, self.mean, self.std = image_root, size, view_spec, mean, std
        self.bank = TeacherBank(bank.classnames,
                                vision={name: ReopeningReader(reader) for name, reader in bank.vision.items()},
                                multimodal={name: (ReopeningReader(reader), columns)
                                            for name, (reader, columns) in bank.multimodal.items()})

    def __getitem__(self, items: list[Item]) -> Batch:
        pixels = torch.empty((len(items), 3, self.size, self.size), dtype=torch.float32)
        for i, (key, view, _) in enumerate(items):
            image = load_image(self.image_root, key)
            params = view_params(key, view, image.width, image.height, self.view_spec)
            pixels[i] = torch.from_numpy(student_pixels(image, params, self.size, self.mean, self.std))
        labels = torch.tensor([label for _, _, label in items], dtype=torch.int64)
        rows = teacher_rows(self.bank, [key for key, _, _ in items], [view for _, view, _ in items])
        return Batch(pixels, labels, list(items), rows)


class EpochOrder(Sampler):
    """The epoch's items in batches of `batch_size`, in order; the last partial batch is dropped when at least one
    full batch exists. Set `items` before each epoch: (persistent) workers receive batches, never the list."""

    def __init__(self, batch_size: int, items: list[Item] | None = None):
        self.batch_size, self.items = batch_size, list(items or [])

    def _batches(self) -> BatchSampler:
        return BatchSampler(self.items, self.batch_size, drop_last=len(self.items) >= self.batch_size)

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def batch_loader(dataset: StudentBatches, order: EpochOrder, workers: int, device: torch.device) -> DataLoader:
    """Whole batches from `workers` processes (0: in the main thread), pinned when they go to a GPU.

    The loader has its own generator, so iterating it never draws from the global torch RNG (the gates' noise
    does); persistent workers keep their reopened readers across epochs."""
    return DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers, collate_fn=as_built,
                      pin_memory=device.type == "cuda" and workers > 0, persistent_workers=workers > 0,
                      generator=torch.Generator())


def as_built(batch: Batch) -> Batch:
    """The loader's collate: a batch arrives finished (the default would turn its item tuples into lists)."""
    return batch


def to_device(rows: dict, device: torch.device) -> dict:
    """Host tensors (nested in dicts) to `device`; asynchronous from pinned memory."""
    if isinstance(rows, dict):
        return {name: to_device(value, device) for name, value in rows.items()}
    return rows.to(device, non_blocking=True)


class ReopeningReader:
    """A `CacheReader` that pickles as its path and reopens in the process that unpickles it (a loader worker
    started by spawn or forkserver). The reopened cache must have the manifest opened here, checked by digest.
    Reopened readers memory-map every array: a worker reads only its batches' rows."""

    def __init__(self, reader: CacheReader):
        self._reader, self.path = reader, reader.path

    @property
    def reader(self) -> CacheReader:
        if self._reader is None:
            reader = CacheReader(self.path, memmap_arrays=self._arrays)
            if manifest_digest(reader.manifest) != self._digest:
                raise CacheError(f"{self.path}: the cache changed after this run opened it; restart the run")
            self._reader = reader
        return self._reader

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.reader, name)

    def __getstate__(self) -> dict:
        reader = self.reader
        return {"path": self.path, "arrays": tuple(reader.arrays), "digest": manifest_digest(reader.manifest)}

    def __setstate__(self, state: dict) -> None:
        self._reader, self.path = None, state["path"]
        self._arrays, self._digest = tuple(state["arrays"]), state["digest"]


def manifest_digest(manifest: Manifest) -> str:
    """What identifies a complete cache's content: its fingerprint, segments and every file's checksum."""
    content = {"fingerprint": manifest.fingerprint, "rows": manifest.rows, "segments": manifest.segments,
               "checksums": manifest.checksums}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

"""Synthetic inputs at the real shapes: complete caches written through `AgentCache`, and images on disk.

No agent runs: rows hold random values of the real shapes (unit fp16 tokens for vision agents), under fingerprint
fields that say so. Vision rows come from a small random pool, each row rolled along its tokens by its own
offset, so a cache of 1,280 real-size rows is written in seconds and every row differs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cache_schema import AgentCache, ArraySpec, ViewSpec, view_params
from cache_schema.student import StudentGrid
from distill.data import open_teachers
from extract.agents import get_agent

from extract.families import ExtractContext, i2t, language, t2i, vision
from pipelines.bench.plans import (
    ALL_AGENTS,
    BENCH_DATASET,
    BENCH_SPLIT,
    I2T_FEATURES,
    LANGUAGE_AGENTS,
    RELATIONAL_DIM,
    T2I_RESOLUTIONS,
    TEMPLATE,
    VISION_AGENTS,
    Shapes,
)
from pipelines.datasets.synthetic import class_names

POOL = 8   # distinct random vision rows behind every synthetic vision cache


def classnames(shapes: Shapes) -> list[str]:
    return class_names(shapes.classes)


def cache_keys(rows: int) -> list[str]:
    return [f"bench/{index:05d}.png" for index in range(rows)]


def student_info(shapes: Shapes) -> StudentGrid:
    return StudentGrid(shapes.student_model, None, shapes.image_size, shapes.patch_size, shapes.width, shapes.layers)


def bench_context(shapes: Shapes, rows: int, views: int = 1, image_root: Path = Path(".")) -> ExtractContext:
    """The extraction context the synthetic caches claim: `rows` keys, `views` views, images of the student's
    size (so the cached view parameters are those stage 2 recomputes for such images)."""
    return ExtractContext(dataset=BENCH_DATASET, image_root=image_root, keys=cache_keys(rows),
                          classnames=classnames(shapes), template=TEMPLATE, student=student_info(shapes),
                          split_hash=BENCH_SPLIT, views=views, view_spec=ViewSpec())


def write_synthetic_caches(cache_root: Path, shapes: Shapes, rows: int, seed: int = 0, agents=ALL_AGENTS,
                           backend: str = "zarr", views: int = 1) -> dict[str, Path]:
    """A complete cache per agent, written through `AgentCache` as `extract` writes one. Returns {agent: dir}."""
    rng = np.random.default_rng(seed)
    ctx = bench_context(shapes, rows, views)
    paths = {}
    for agent in agents:
        family_fields, arrays, cache_rows, make = _synthetic_agent(agent, ctx, shapes, rng)
        paths[agent] = write_cache(cache_root, agent, bench_fields(agent, family_fields), arrays, cache_rows, make,
                                   backend)
    return paths


def vision_arrays(shapes: Shapes) -> dict[str, ArraySpec]:
    return {"tokens": ArraySpec((shapes.layers, shapes.tokens, shapes.width), "float16"),
            "token_mean": ArraySpec((shapes.layers, shapes.width), "float32"), "views": ArraySpec((5,), "int32")}


class PooledVisionRows:
    """make(rows) of a vision cache: row i of the key order is pool[i % POOL] rolled by i // POOL tokens (the
    token means are the pool row's: rolling the tokens keeps them), the view parameters those of the image."""

    def __init__(self, shapes: Shapes, ctx: ExtractContext, rng: np.random.Generator):
        self.shapes, self.views = shapes, ctx.views
        self.position = {key: index for index, key in enumerate(ctx.keys)}
        pool = _unit(rng, (POOL, shapes.layers, shapes.tokens, shapes.width)).astype(np.float16)
        self.pool, self.pool_means = pool, pool.astype(np.float32).mean(axis=2)

    def __call__(self, rows: list[tuple[str, int]]) -> dict[str, np.ndarray]:
        size = self.shapes.image_size
        order = [self.position[key] * self.views + view for key, view in rows]
        tokens = np.stack([np.roll(self.pool[i % POOL], i // POOL, axis=1) for i in order])
        views = [view_params(key, view, size, size) for key, view in rows]
        return {"tokens": tokens, "token_mean": self.pool_means[[i % POOL for i in order]], "views": np.stack(views)}


def _unit(rng: np.random.Generator, shape) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    return values / np.linalg.norm(values, axis=-1, keepdims=True)


def _synthetic_agent(agent: str, ctx: ExtractContext, shapes: Shapes, rng: np.random.Generator):
    """(family fields, array specs, rows, make(rows) -> arrays) of one agent's synthetic cache."""
    classes = len(ctx.classnames)
    image_rows = [(key, 0) for key in ctx.keys]
    if agent in VISION_AGENTS:
        rows = [(key, view) for key in ctx.keys for view in range(ctx.views)]
        return vision.fingerprint_fields(ctx), vision_arrays(shapes), rows, PooledVisionRows(shapes, ctx, rng)
    if agent in (*LANGUAGE_AGENTS, "bert"):
        dim = RELATIONAL_DIM if agent == "bert" else _embed_dim(shapes)
        return (language.fingerprint_fields(ctx), {"class_features": ArraySpec((dim,), "float32")},
                [(name, 0) for name in ctx.classnames], lambda rows: {"class_features": _unit(rng, (len(rows), dim))})
    if agent in T2I_RESOLUTIONS:
        shape = (T2I_RESOLUTIONS[agent], classes)
        return (t2i.fingerprint_fields(ctx), {"scores": ArraySpec(shape, "float32")}, image_rows,
                lambda rows: {"scores": rng.standard_normal((len(rows), *shape), dtype=np.float32)})
    if agent in I2T_FEATURES:
        dim = I2T_FEATURES[agent]

        def make(rows):
            return {"scores": rng.uniform(-1, 1, (len(rows), classes)).astype(np.float32),
                    "image_features": _unit(rng, (len(rows), dim))}

        arrays = {"scores": ArraySpec((classes,), "float32"), "image_features": ArraySpec((dim,), "float32")}
        return i2t.fingerprint_fields(ctx), arrays, image_rows, make
    raise ValueError(f"unknown bench agent {agent!r}")


def _embed_dim(shapes: Shapes) -> int:
    return 512 if shapes.real else 32   # open_clip ViT-B-16 / TransAgent-Tiny-CLIP joint space


def bench_fields(agent: str, family_fields: dict) -> dict:
    """Fingerprint fields of a bench cache: the agent's own fields (stage 2 reads e.g. its preprocessing), saying
    where the rows came from."""
    return {"agent": {**get_agent(agent).fingerprint_fields(tiny=False), "source": "bench: synthetic rows"},
            "dataset": {"name": BENCH_DATASET, "split_hash": BENCH_SPLIT}, "family": family_fields}


def write_cache(cache_root: Path, agent: str, fields: dict, arrays: dict, rows: list, make, backend: str = "zarr",
                batch: int = 4) -> Path:
    """A complete cache through `AgentCache`, as `extract` writes one: plan, create segments, write, finalise."""
    cache = AgentCache.open(cache_root, BENCH_DATASET, agent, fields, arrays, backend)
    plan = cache.plan(rows)
    cache.create_segments()
    for name, local in plan[0]:
        with cache.segment_writer(name) as writer:
            for start in range(0, len(local), batch):
                chunk = local[start:start + batch]
                writer.write(chunk, make([writer.rows[i] for i in chunk]))
    cache.finalize()
    return cache.path


def open_bank(cache_root: Path, shapes: Shapes, agents=ALL_AGENTS):
    return open_teachers(cache_root, BENCH_DATASET, BENCH_SPLIT, list(agents), classnames(shapes), "all")


def write_student_images(root: Path, shapes: Shapes, rows: int, seed: int = 0) -> Path:
    """PNG images of the student's size under the synthetic cache keys, so stage 2 can load what they cache."""
    rng = np.random.default_rng(seed)
    for key in cache_keys(rows):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (shapes.image_size, shapes.image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / key)
    return root


def write_images(root: Path, count: int, size: tuple[int, int], seed: int = 0, suffix: str = ".jpg") -> list[str]:
    """`count` random-texture images (smooth gradients + noise) under root; returns their keys."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    keys = []
    for index in range(count):
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(80, 220, 3)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        key = f"images/{index:05d}{suffix}"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / key, quality=90) if suffix == ".jpg" else \
            Image.fromarray(pixels).save(root / key)
        keys.append(key)
    return keys

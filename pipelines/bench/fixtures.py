"""Synthetic inputs at the real shapes: complete caches written through `AgentCache`, and images on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.bench.plans import (ALL_AGENTS, BENCH_DATASET, BENCH_SPLIT, I2T_FEATURES, LANGUAGE_AGENTS,
                                   RELATIONAL_DIM, T2I_RESOLUTIONS, TEMPLATE, VISION_AGENTS, Shapes)


def classnames(shapes: Shapes) -> list[str]:
    from pipelines.datasets.synthetic import class_names

    return class_names(shapes.classes)


def cache_keys(rows: int) -> list[str]:
    return [f"bench/{index:05d}.png" for index in range(rows)]


def student_info(shapes: Shapes):
    from cache_schema.student import StudentGrid

    return StudentGrid(shapes.student_model, None, shapes.image_size, shapes.patch_size, shapes.width, shapes.layers)


def write_synthetic_caches(cache_root: Path, shapes: Shapes, rows: int, seed: int = 0,
                           agents=ALL_AGENTS, backend: str = "zarr") -> dict[str, Path]:
    """A complete cache per agent, written through `AgentCache` as `extract` writes one, holding rows of the real
    shapes with random values (unit fp16 tokens for vision agents). Returns {agent: cache dir}."""
    from cache_schema import ViewSpec
    from extract.families import ExtractContext

    rng = np.random.default_rng(seed)
    ctx = ExtractContext(dataset=BENCH_DATASET, image_root=cache_root, keys=cache_keys(rows),
                         classnames=classnames(shapes), template=TEMPLATE, student=student_info(shapes),
                         split_hash=BENCH_SPLIT, views=1, view_spec=ViewSpec())
    paths = {}
    for agent in agents:
        family_fields, arrays, cache_rows, make = _synthetic_agent(agent, ctx, shapes, rng)
        paths[agent] = write_cache(cache_root, agent, bench_fields(agent, family_fields), arrays, cache_rows, make,
                                   backend)
    return paths


def _synthetic_agent(agent: str, ctx, shapes: Shapes, rng: np.random.Generator):
    """(family fields, array specs, rows, make(rows) -> arrays) of one agent's synthetic cache."""
    from cache_schema import ArraySpec, view_params
    from extract.families import i2t, language, t2i, vision

    classes = len(ctx.classnames)
    image_rows = [(key, 0) for key in ctx.keys]

    def unit(shape):
        values = rng.standard_normal(shape, dtype=np.float32)
        return values / np.linalg.norm(values, axis=-1, keepdims=True)

    if agent in VISION_AGENTS:
        def make(rows):
            tokens = unit((len(rows), shapes.layers, shapes.tokens, shapes.width)).astype(np.float16)
            views = [view_params(key, view, shapes.image_size, shapes.image_size) for key, view in rows]
            return {"tokens": tokens, "token_mean": tokens.astype(np.float32).mean(axis=2), "views": np.stack(views)}

        arrays = {"tokens": ArraySpec((shapes.layers, shapes.tokens, shapes.width), "float16"),
                  "token_mean": ArraySpec((shapes.layers, shapes.width), "float32"), "views": ArraySpec((5,), "int32")}
        return vision.fingerprint_fields(ctx), arrays, image_rows, make
    if agent in (*LANGUAGE_AGENTS, "bert"):
        dim = RELATIONAL_DIM if agent == "bert" else _embed_dim(shapes)
        return (language.fingerprint_fields(ctx), {"class_features": ArraySpec((dim,), "float32")},
                [(name, 0) for name in ctx.classnames], lambda rows: {"class_features": unit((len(rows), dim))})
    if agent in T2I_RESOLUTIONS:
        shape = (T2I_RESOLUTIONS[agent], classes)
        return (t2i.fingerprint_fields(ctx), {"scores": ArraySpec(shape, "float32")}, image_rows,
                lambda rows: {"scores": rng.standard_normal((len(rows), *shape), dtype=np.float32)})
    if agent in I2T_FEATURES:
        dim = I2T_FEATURES[agent]

        def make(rows):
            return {"scores": rng.uniform(-1, 1, (len(rows), classes)).astype(np.float32),
                    "image_features": unit((len(rows), dim))}

        arrays = {"scores": ArraySpec((classes,), "float32"), "image_features": ArraySpec((dim,), "float32")}
        return i2t.fingerprint_fields(ctx), arrays, image_rows, make
    raise ValueError(f"unknown bench agent {agent!r}")


def _embed_dim(shapes: Shapes) -> int:
    return 512 if shapes.real else 32   # open_clip ViT-B-16 / TransAgent-Tiny-CLIP joint space


def bench_fields(agent: str, family_fields: dict) -> dict:
    """Fingerprint fields of a bench cache: the agent's own fields (stage 2 reads e.g. its preprocessing), saying
    where the rows came from."""
    from extract.agents import get_agent

    return {"agent": {**get_agent(agent).fingerprint_fields(tiny=False), "source": "bench: synthetic rows"},
            "dataset": {"name": BENCH_DATASET, "split_hash": BENCH_SPLIT}, "family": family_fields}


def write_cache(cache_root: Path, agent: str, fields: dict, arrays: dict, rows: list, make, backend: str = "zarr",
                batch: int = 4) -> Path:
    """A complete cache through `AgentCache`, as `extract` writes one: plan, create segments, write, finalise."""
    from cache_schema import AgentCache

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
    from distill.data import open_teachers

    return open_teachers(cache_root, BENCH_DATASET, BENCH_SPLIT, list(agents), classnames(shapes), "all")


def write_images(root: Path, count: int, size: tuple[int, int], seed: int = 0, suffix: str = ".jpg") -> list[str]:
    """`count` random-texture images (smooth gradients + noise) under root; returns their keys."""
    from PIL import Image

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

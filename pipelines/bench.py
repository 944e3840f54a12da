"""Performance benchmarks (DESIGN §8): `transagent bench` writes bench/results.json and prints a short table.

At ViT-B/16 shapes with random weights (224 px, 196 tokens, 12 layers, 768 dims, 4 vision agents, 10 classes,
batch 4), on the CPU and on the GPU when one is present:

1. stage-2 overhead: the training step reading every cache / the student-only step (CE, no cache);
2. cache vs live teachers: the step with the four vision agents run on each batch / the cached step, as the
   official code runs them (autograd on, weights requiring grad; reference §3.1) and under no_grad;
3. extraction: `extract` throughput of one vision agent / its bare forward on the same batches, and the wall
   time of a repeated `extract` over a complete cache (a fresh process, as a user runs it);
4. cache reads: a random batch from the stage-2 reader / np.memmap of the same rows in one .npy file;
5. scaling: extraction time and cache size for 100 / 1,000 / 10,000 rows of a tiny agent.

Everything runs the real code: `distill.trainer.Trainer.step` over a TeacherBank from `open_teachers`, reading
caches written by `cache_schema.AgentCache` (synthetic rows of the real shapes: random unit tokens in fp16, so no
agent has to run), and the extract runner (`extract.runner.run_agent`) for items 3 and 5.

Method. Times are medians over repetitions after warm-up. A comparison is the median of per-round ratios with
the variants interleaved in one process (A B, B A, A B, ...), so a machine that slows down slows both sides of
the ratio. The memory of a variant is the peak of a fresh process that runs only that variant
(`pipelines.bench_workers`): anonymous RSS on CPU (sampled; memory-mapped cache pages belong to the page cache,
not to the process), torch.cuda.max_memory_allocated on GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

BENCH_DATASET = "bench"
BENCH_SPLIT = "synthetic-bench-rows"
VISION_AGENTS = ("dino", "mae", "sam", "vitdet")
LANGUAGE_AGENTS = ("gpt3", "vicuna")     # [C, embed_dim] in the student's text space
RELATIONAL_DIM = 384                     # bert (all-MiniLM-L6-v2) class features in its own space
T2I_RESOLUTIONS = {"sd": 3, "pixart": 1}  # scores [R_res, C]
I2T_FEATURES = {"blip2": 2560, "shikra": 4096}  # scores [C] + image features [d] (OPT-2.7b, LLaMA-7B widths)
ALL_AGENTS = (*VISION_AGENTS, *LANGUAGE_AGENTS, "bert", *T2I_RESOLUTIONS, *I2T_FEATURES)
VARIANTS = ("student", "cached", "live-nograd", "live-official")
TEMPLATE = "a photo of a {}."


# ---------------------------------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class Shapes:
    student_model: str   # open_clip architecture, built with random weights
    image_size: int
    patch_size: int
    width: int
    layers: int
    real: bool           # True: real-size random agents; False: the registry's tiny agents
    classes: int = 10
    batch: int = 4

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "tokens": self.tokens, "vision_agents": list(VISION_AGENTS),
                "cached_agents": list(ALL_AGENTS)}


VIT_B16 = Shapes("ViT-B-16", 224, 16, 768, 12, real=True)
TINY = Shapes("TransAgent-Tiny-CLIP", 32, 8, 64, 3, real=False)


@dataclass(frozen=True)
class Plan:
    name: str
    shapes: Shapes
    warmup: int                  # warm-up steps of the student-only and cached variants
    live_warmup: int             # warm-up steps of each live variant
    reps: int                    # item 1: timed rounds of (student-only, cached)
    live_reps: int               # item 2: timed rounds of (cached, live no_grad, live official-style)
    memory_steps: int            # steps in each fresh memory process
    cache_rows: int              # rows per synthetic vision / t2i / i2t cache
    extract_rows: int            # item 3: rows (= images x 2 views) per extraction
    extract_batch: int
    extract_reps: int            # item 3: timed rounds (after one warm-up round)
    read_batches: int            # item 4: random batches per reader
    scaling_rows: tuple[int, ...]
    repeat_runs: int             # item 3b: fresh `extract` processes over a complete cache
    memory_variants: tuple[str, ...] = VARIANTS
    gpu_warmup: int = 3
    gpu_reps: int = 10
    gpu_extract_rows: int = 128
    gpu_extract_batch: int = 32


PLANS = {
    "full": Plan("full", VIT_B16, warmup=1, live_warmup=1, reps=5, live_reps=3, memory_steps=2, cache_rows=32,
                 extract_rows=64,
                 extract_batch=8, extract_reps=3, read_batches=200, scaling_rows=(100, 1_000, 10_000),
                 repeat_runs=3),
    "quick": Plan("quick", VIT_B16, warmup=1, live_warmup=0, reps=3, live_reps=1, memory_steps=1, cache_rows=8,
                  extract_rows=32,
                  extract_batch=8, extract_reps=1, read_batches=50, scaling_rows=(100, 1_000), repeat_runs=1,
                  gpu_reps=5),
    # tiny shapes, one step of everything: the harness's own test (tests/test_bench.py)
    "smoke": Plan("smoke", TINY, warmup=0, live_warmup=0, reps=1, live_reps=1, memory_steps=1, cache_rows=8,
                  extract_rows=4, extract_batch=2, extract_reps=1, read_batches=5, scaling_rows=(8, 16), repeat_runs=1,
                  memory_variants=("cached",), gpu_warmup=0, gpu_reps=1, gpu_extract_rows=4,
                  gpu_extract_batch=2),
}


# ---------------------------------------------------------------------------------------------------- machine

def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, library versions, the GPU if any."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": model, "cpu_count": os.cpu_count(), "usable_cores": usable, "torch_threads": torch.get_num_threads(),
        "memory_bytes": _meminfo("MemTotal"), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "load_average_at_start": _load_average(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("open_clip", "transformers", "zarr", "h5py"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # noqa: BLE001 - versions are informational
            info[package] = None
    return info


def _meminfo(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- timing

def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def interleaved(runs: dict[str, Callable[[int], None]], reps: int, warmup: dict[str, int],
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each variant over `reps` rounds, after each variant's warm-up calls.

    Round r runs the variants in order, reversed on odd rounds (A B, B A, ...): a slow-down of the machine lands
    on both sides of every ratio. Each call gets its own index (e.g. which batch to use)."""
    names = list(runs)
    index = 0
    for name in names:
        for _ in range(warmup.get(name, 0)):
            runs[name](index)
            index += 1
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(reps):
        for name in names if round_number % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            runs[name](index)
            sync()
            times[name].append(time.perf_counter() - start)
            index += 1
    return times


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median(values) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------- caches

def classnames(shapes: Shapes) -> list[str]:
    from pipelines.datasets.synthetic import class_names

    return class_names(shapes.classes)


def cache_keys(rows: int) -> list[str]:
    return [f"bench/{index:05d}.png" for index in range(rows)]


def student_info(shapes: Shapes):
    from extract.agents.base import StudentInfo

    return StudentInfo(shapes.student_model, None, shapes.image_size, shapes.patch_size, shapes.width, shapes.layers)


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


# ---------------------------------------------------------------------------------------------------- agents

# Real-size configurations (the published models' shapes); weights are random, built locally, seeded.
VIT_B16_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                  "image_size": 224, "patch_size": 16, "qkv_bias": True, "layer_norm_eps": 1e-6}
SAM_VIT_B_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_dim": 3072,
                    "image_size": 1024, "patch_size": 16, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11],
                    "output_channels": 256}
VITDET_B_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                   "image_size": 1024, "pretrain_image_size": 224, "patch_size": 16, "window_size": 14,
                   "window_block_indices": [0, 1, 3, 4, 6, 7, 9, 10], "use_relative_position_embeddings": True,
                   "use_absolute_position_embeddings": True, "qkv_bias": True, "layer_norm_eps": 1e-6}


def real_size_load(name: str):
    """A loader for agent `name` that builds the real-size model with random weights, the way the agent module
    builds its tiny model (same runtime class, same resizing at load), so no checkpoint is needed."""
    from extract.agents import dino, mae, sam, vitdet
    from extract.agents._loading import seeded
    from extract.families.vision import IMAGENET_MEAN, IMAGENET_STD

    def load(request):
        from transformers import SamVisionConfig, ViTConfig, ViTMAEConfig, ViTModel, ViTMAEModel, VitDetConfig, \
            VitDetModel
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        source = {"source": "bench: random weights at real size", "seed": request.seed}
        common = dict(device=request.device, dtype=request.dtype, source=source)
        with seeded(request.seed):
            if name == "dino":
                model = ViTModel(ViTConfig(**VIT_B16_CONFIG), add_pooling_layer=False)
                return dino.DinoRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
            if name == "mae":
                model = ViTMAEModel(ViTMAEConfig(**VIT_B16_CONFIG, mask_ratio=0.0))
                return mae.MaeRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
            if name == "sam":
                native = SamVisionEncoder(SamVisionConfig(**SAM_VIT_B_CONFIG))
                return sam.SamRuntime(sam.at_image_size(native, request.student.image_size), request.student,
                                      mean=sam.SAM_PIXEL_MEAN, std=sam.SAM_PIXEL_STD, pixel_scale=255.0, **common)
            if name == "vitdet":
                model = VitDetModel(VitDetConfig(**VITDET_B_CONFIG))
                return vitdet.VitDetRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
        raise ValueError(f"no real-size configuration for agent {name!r}")

    return load


def agent_spec(name: str, shapes: Shapes):
    """The registry's AgentSpec; at real shapes its loader builds random real-size weights instead of downloading."""
    from extract.agents import get_agent
    from extract.agents.base import Source

    spec = get_agent(name)
    if not shapes.real:
        return spec
    return dataclasses.replace(spec, load=real_size_load(name), source=Source(note="bench: random real-size weights"))


def agent_dtype(device: str) -> str:
    return "float16" if device.startswith("cuda") else "float32"   # as `transagent extract` chooses


def vision_runtimes(shapes: Shapes, device: str) -> dict:
    from extract.agents.base import LoadRequest

    request = LoadRequest(tiny=not shapes.real, student=student_info(shapes), device=device,
                          dtype=agent_dtype(device))
    return {name: agent_spec(name, shapes).load(request) for name in VISION_AGENTS}


def register_tiny(shapes: Shapes) -> None:
    if not shapes.real:
        from pipelines.presets import register_model_configs

        register_model_configs()


# ---------------------------------------------------------------------------------------------------- stage 2

def live_vision_inputs(runtimes: dict, pixels01, official: bool) -> tuple[dict, dict]:
    """Run the vision agents on [0, 1] pixels: ({agent: unit tokens [B, L, T, D]}, {agent: token means [B, L, D]}).

    official=False is stage 1's own code (`VisionRuntime.encode`: no_grad, weights frozen). official=True runs
    the same block outputs with autograd on and every teacher weight requiring grad, as the official trainer does
    (reference §3.1): backward then runs through the four teachers and fills their (never used) .grad."""
    import torch
    import torch.nn.functional as F

    from extract.families.vision import normalise_pixels

    tokens, means = {}, {}
    for name, runtime in runtimes.items():
        runtime.model.requires_grad_(official)
        pixels = normalise_pixels(pixels01, runtime)
        if official:
            with torch.enable_grad():
                grids = runtime.block_outputs(pixels.to(runtime.device, runtime.model.dtype)).float()
            batch, layers, grid, _, dim = grids.shape
            if grid != runtime.grid:
                raise ValueError(f"agent {name}: grid {grid} != student grid {runtime.grid}")
            values = grids.reshape(batch, layers, grid * grid, dim)
        else:
            values = runtime.encode(pixels)
        tokens[name] = F.normalize(values, dim=-1)
        means[name] = tokens[name].mean(dim=2)
    return tokens, means


def _live_trainer_class():
    from distill.trainer import Trainer

    class LiveTeachersTrainer(Trainer):
        """The training step with the vision agents run on each batch instead of read from their caches.

        Everything else (student, gates, losses, optimiser, the other agents' caches) is `Trainer`'s own."""

        def __init__(self, *args, runtimes: dict, official: bool, **kwargs):
            super().__init__(*args, **kwargs)
            self.runtimes, self.official = runtimes, official
            self._other_agents = dataclasses.replace(self.bank, vision={})
            self._pixels = None

        def step(self, pixels, labels, batch):
            self._pixels = pixels
            return super().step(pixels, labels, batch)

        def teacher_inputs(self, keys, views):
            bank, self.bank = self.bank, self._other_agents   # every cache but the vision ones ...
            try:
                inputs = super().teacher_inputs(keys, views)
            finally:
                self.bank = bank
            mean = self._pixels.new_tensor(self.mean).view(1, 3, 1, 1)
            std = self._pixels.new_tensor(self.std).view(1, 3, 1, 1)
            pixels01 = self._pixels * std + mean  # ... and the vision agents on the student's own pixels
            inputs["vision_tokens"], inputs["vision_token_means"] = live_vision_inputs(self.runtimes, pixels01,
                                                                                       self.official)
            return inputs

    return LiveTeachersTrainer


def build_trainers(plan: Plan, cache_root: Path, device: str, run_dir: Path, variants=VARIANTS) -> dict:
    """One `Trainer` per variant: student (no agents), cached (every cache), live-nograd, live-official."""
    from distill.config import PromptConfig, StudentConfig
    from distill.data import TeacherBank
    from distill.trainer import RunConfig, Trainer

    shapes = plan.shapes
    register_tiny(shapes)
    names = classnames(shapes)
    bank = open_bank(cache_root, shapes)
    runtimes = vision_runtimes(shapes, device) if any(v.startswith("live") for v in variants) else {}
    live_class = _live_trainer_class()
    trainers = {}
    for variant in variants:
        config = RunConfig(dataset=BENCH_DATASET, protocol="base2novel", shots=16, seed=1,
                           agents=() if variant == "student" else tuple(ALL_AGENTS),
                           prompts=PromptConfig(depth_vision=min(9, shapes.layers), depth_text=min(9, shapes.layers)),
                           student=StudentConfig(shapes.student_model, None), device=device)
        # no keys: the bench feeds batches to `step` itself, so no image is read (image_root is unused)
        args = (config, [], [], names, run_dir)
        if variant == "student":
            trainers[variant] = Trainer(*args, TeacherBank(names), run_dir, progress=False)
        elif variant == "cached":
            trainers[variant] = Trainer(*args, bank, run_dir, progress=False)
        elif variant in ("live-nograd", "live-official"):
            trainers[variant] = live_class(*args, bank, run_dir, progress=False, runtimes=runtimes,
                                           official=variant == "live-official")
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return trainers


def step_batches(plan: Plan, count: int, seed: int = 0) -> list[tuple]:
    """`count` training batches (pixels, labels, [(key, view, label)]) over the cached keys, random pixels."""
    import torch

    from distill.data import CLIP_MEAN, CLIP_STD

    shapes = plan.shapes
    keys = cache_keys(plan.cache_rows)
    rng = np.random.default_rng(seed)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    batches = []
    for _ in range(count):
        rows = rng.choice(len(keys), size=shapes.batch, replace=False)
        labels = rng.integers(0, shapes.classes, size=shapes.batch)
        pixels01 = torch.from_numpy(rng.random((shapes.batch, 3, shapes.image_size, shapes.image_size),
                                               dtype=np.float32))
        batches.append(((pixels01 - mean) / std, torch.from_numpy(labels),
                        [(keys[r], 0, int(label)) for r, label in zip(rows, labels)]))
    return batches


def stage2_timing(plan: Plan, cache_root: Path, device: str, run_dir: Path) -> dict:
    """Item 1 (student-only vs cached, interleaved), item 2 (cached vs both live variants, interleaved), and the
    cached step's cache fetch on its own."""
    cuda = device.startswith("cuda")
    warmup, live_warmup = (plan.gpu_warmup, plan.gpu_warmup) if cuda else (plan.warmup, plan.live_warmup)
    reps, live_reps = (plan.gpu_reps, plan.gpu_reps) if cuda else (plan.reps, plan.live_reps)
    trainers = build_trainers(plan, cache_root, device, run_dir)
    batches = step_batches(plan, 2 * warmup + 2 * live_warmup + 3 * max(reps, live_reps))
    sync = synchronizer(device)

    def step(variant):
        return lambda index: trainers[variant].step(*batches[index])

    overhead = interleaved({v: step(v) for v in ("student", "cached")}, reps,
                           {"student": warmup, "cached": warmup}, sync)
    live = interleaved({v: step(v) for v in ("cached", "live-nograd", "live-official")}, live_reps,
                       {"live-nograd": live_warmup, "live-official": live_warmup}, sync)
    cached = trainers["cached"]
    fetch = []
    for _, _, batch in batches[:3]:
        sync()
        start = time.perf_counter()
        cached.teacher_inputs([key for key, _, _ in batch], [view for _, view, _ in batch])
        sync()
        fetch.append(time.perf_counter() - start)
    return {"overhead_seconds": overhead, "live_seconds": live, "fetch_seconds": fetch,
            "warmup": {"student": warmup, "cached": warmup, "live": live_warmup}, "rounds": [reps, live_reps],
            "gate_parameters": sum(p.numel() for p in cached.gates.parameters())}


def memory_in_fresh_processes(plan: Plan, cache_root: Path, device: str, run_dir: Path) -> dict:
    """Peak memory of each variant, each in its own process (`python -m pipelines.bench_workers memory`)."""
    out = {}
    for variant in plan.memory_variants:
        out[variant] = run_worker(["memory", "--plan", plan.name, "--variant", variant, "--cache-root",
                                   str(cache_root), "--device", device, "--steps", str(plan.memory_steps),
                                   "--run-dir", str(run_dir)])
    return out


def run_worker(args: list[str], timeout: float = 1800) -> dict:
    """Run `python -m pipelines.bench_workers ARGS`; its last stdout line is a JSON report."""
    command = [sys.executable, "-m", "pipelines.bench_workers", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"bench worker failed ({' '.join(args[:3])}...): exit {done.returncode}\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vision_row_bytes(shapes: Shapes) -> int:
    """One cached vision row: fp16 tokens [L, T, D] + fp32 token means [L, D] + the view (5 x int32)."""
    return shapes.layers * shapes.tokens * shapes.width * 2 + shapes.layers * shapes.width * 4 + 20


def teacher_batch_bytes(shapes: Shapes) -> int:
    """Vision-agent rows of one batch as the cached step holds them: fp16 tokens + float32 token means."""
    per_agent = shapes.batch * shapes.layers * shapes.width * (shapes.tokens * 2 + 4)
    return per_agent * len(VISION_AGENTS)


# ---------------------------------------------------------------------------------------------------- extraction

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


def _extract_job(spec, shapes: Shapes, image_root: Path, keys: list[str], views: int, batch: int, device: str):
    from extract.agents.base import LoadRequest
    from extract.families import ExtractContext
    from extract.runner import AgentJob

    student = student_info(shapes)
    ctx = ExtractContext(dataset=BENCH_DATASET, image_root=image_root, keys=keys, classnames=classnames(shapes),
                         template=TEMPLATE, student=student, split_hash=BENCH_SPLIT, views=views,
                         batch_size=batch, device=device)
    request = LoadRequest(tiny=not shapes.real, student=student, device=device, dtype=agent_dtype(device))
    return AgentJob(spec, ctx, request)


def extraction_vs_forward(plan: Plan, work: Path, device: str) -> dict:
    """Item 3: `run_agent` for one vision agent (dino) / the bare forward (`block_outputs`) on the same batches.

    The one-off model build is timed by wrapping the loader and reported apart; the throughput compared is the
    runner's steady state (images decoded, views cut, forward, normalise, fp16, rows written and journalled)."""
    import torch

    from extract.families.vision import normalise_pixels
    from extract.runner import needed_rows, run_agent
    from cache_schema import apply_view, view_params
    from PIL import Image

    shapes = plan.shapes
    cuda = device.startswith("cuda")
    rows = plan.gpu_extract_rows if cuda else plan.extract_rows
    batch_size = plan.gpu_extract_batch if cuda else plan.extract_batch
    image_root = work / "extract-images"
    keys = write_images(image_root, rows // 2, (320, 240))
    base_spec = agent_spec("dino", shapes)
    load_seconds: list[float] = []

    def timed_load(request):
        start = time.perf_counter()
        runtime = base_spec.load(request)
        load_seconds.append(time.perf_counter() - start)
        return runtime

    spec = dataclasses.replace(base_spec, load=timed_load)
    job = _extract_job(spec, shapes, image_root, keys, 2, batch_size, device)
    runtime = base_spec.load(job.request)          # the bare forward's copy of the same model
    ordered = needed_rows(job)
    batches = []
    for start in range(0, len(ordered), batch_size):
        pixels = []
        for key, view in ordered[start:start + batch_size]:
            with Image.open(image_root / key) as image:
                params = view_params(key, view, image.width, image.height, job.ctx.view_spec)
                pixels.append(np.asarray(apply_view(image, params, shapes.image_size), dtype=np.uint8))
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
        batches.append(normalise_pixels(batch, runtime).to(runtime.device, runtime.model.dtype))
    sync = synchronizer(device)
    reports, roots = [], []

    def extract(index):  # a new cache root each call, removed after the timing
        reports.append(run_agent(job, work / f"extract-cache-{index}", progress=False))
        roots.append(work / f"extract-cache-{index}")

    def bare(index):
        with torch.no_grad():
            for pixels in batches:
                runtime.block_outputs(pixels)

    times = interleaved({"extract": extract, "forward": bare}, plan.extract_reps, {"extract": 1, "forward": 1},
                        sync)
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    # each extract call built its model once: subtract that call's own build time (warm-up call first)
    steady = [seconds - load for seconds, load in zip(times["extract"], load_seconds[1:])]
    return {"rows": rows, "batch": batch_size, "row_bytes": vision_row_bytes(shapes),
            "extract_seconds": times["extract"],
            "model_build_seconds": load_seconds[1:], "extract_steady_seconds": steady,
            "forward_seconds": times["forward"], "statuses": [r.status for r in reports]}


def repeat_extract(plan: Plan, work: Path) -> dict:
    """Item 3b: `transagent extract` again over a complete cache, each in a fresh process, against the start-up
    floor of `transagent --help` in a fresh process."""
    from pipelines.cli import main
    from pipelines.datasets import make_synthetic

    data, cache = work / "repeat-data", work / "repeat-cache"
    make_synthetic(data)
    agents = "dino" if plan.name == "smoke" else "all"
    args = ["extract", "--dataset", "synthetic", "--preset", "tiny", "--agents", agents, "--data-root", str(data),
            "--cache-root", str(cache)]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as first_output, contextlib.redirect_stderr(io.StringIO()):
        main(args, standalone_mode=False)   # the first run computes every row
    first = time.perf_counter() - start
    again, floor, reports = [], [], []
    for _ in range(plan.repeat_runs):
        for name in ("again", "floor"):
            start = time.perf_counter()
            if name == "again":
                reports.append(run_worker(["extract-again", *args], timeout=600))
                again.append(time.perf_counter() - start)
            else:
                subprocess.run([sys.executable, "-m", "pipelines", "--help"], capture_output=True, check=True)
                floor.append(time.perf_counter() - start)
    return {"agents": agents, "first_seconds": first, "again_seconds": again, "help_seconds": floor,
            "torch_imported": any(r["torch_imported"] for r in reports),
            "transformers_imported": any(r["transformers_imported"] for r in reports),
            "first_output": first_output.getvalue(), "output": reports[-1]["output"] if reports else ""}


# ---------------------------------------------------------------------------------------------------- cache reads

def cache_reads(plan: Plan, dino_cache: Path, work: Path) -> dict:
    """Item 4: random batches from `CacheReader.read("tokens")` (zarr, and hdf5) / np.memmap of one .npy file
    holding the same rows, interleaved per batch; plus the whole stage-2 fetch of the step (`vision_batch`)."""
    from cache_schema import CacheReader

    shapes = plan.shapes
    zarr_reader = CacheReader(dino_cache)
    rows = list(zarr_reader.rows)
    everything = zarr_reader.read("tokens", rows)
    hdf5_root = work / "cache-hdf5"
    hdf5_path = _copy_to_hdf5(zarr_reader, hdf5_root)
    plain_path = work / "plain-tokens.npy"
    np.save(plain_path, everything)
    plain = np.load(plain_path, mmap_mode="r")
    readers = {"zarr": zarr_reader, "hdf5": CacheReader(hdf5_path)}
    rng = np.random.default_rng(1)
    picks = [rng.choice(len(rows), size=shapes.batch, replace=False) for _ in range(plan.read_batches + 5)]
    out = {"batch_bytes": int(everything[:shapes.batch].nbytes), "rows_in_cache": len(rows)}
    for backend, reader in readers.items():
        def stage2(index, reader=reader):
            reader.read("tokens", [rows[i] for i in picks[index % len(picks)]])

        def memmap(index):
            np.ascontiguousarray(plain[picks[index % len(picks)]])

        times = interleaved({"reader": stage2, "memmap": memmap}, plan.read_batches, {"reader": 5, "memmap": 5})
        out[backend] = times
    check = readers["zarr"].read("tokens", [rows[i] for i in picks[0]])
    if not np.array_equal(check, plain[picks[0]]):
        raise AssertionError("the stage-2 reader and the plain memmap returned different rows")
    return out


def _copy_to_hdf5(reader, root: Path) -> Path:
    """The same rows in an hdf5-backend cache."""
    rows = list(reader.rows)
    values = {name: reader.read(name, rows) for name in reader.arrays}
    position = {row: i for i, row in enumerate(rows)}
    fields = {key: value for key, value in reader.manifest["fields"].items() if key != "schema_version"}
    return write_cache(root, reader.agent, fields, reader.arrays, rows,
                       lambda batch: {name: value[[position[row] for row in batch]] for name, value in values.items()},
                       "hdf5")


# ---------------------------------------------------------------------------------------------------- scaling

def scaling(plan: Plan, work: Path) -> list[dict]:
    """Item 5: the tiny dino agent through `run_agent` for N rows (N/4 images x 4 views): time and bytes."""
    from extract.agents import get_agent
    from extract.runner import run_agent

    register_tiny(TINY)
    views = 4
    image_root = work / "scaling-images"
    keys = write_images(image_root, max(plan.scaling_rows) // views, (48, 40), suffix=".png")
    run_agent(_extract_job(get_agent("dino"), TINY, image_root, keys[:2], views, 16, "cpu"), work / "warm-up",
              progress=False)   # one-off imports and first-call costs stay out of the first row of the table
    table = []
    for rows in plan.scaling_rows:
        job = _extract_job(get_agent("dino"), TINY, image_root, keys[:rows // views], views, 16, "cpu")
        cache_root = work / f"scaling-cache-{rows}"
        start = time.perf_counter()
        report = run_agent(job, cache_root, progress=False)
        seconds = time.perf_counter() - start
        apparent, allocated, files = _disk_usage(Path(report.cache))
        table.append({"rows": report.rows, "seconds": seconds, "rows_per_second": report.rows / seconds,
                      "bytes": apparent, "bytes_on_disk": allocated, "files": files,
                      "bytes_per_row": apparent / report.rows, "disk_bytes_per_row": allocated / report.rows,
                      "payload_bytes_per_row": _payload_per_row(Path(report.cache))})
        shutil.rmtree(cache_root, ignore_errors=True)
    return table


def _disk_usage(path: Path) -> tuple[int, int, int]:
    apparent = allocated = files = 0
    for directory, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(directory, name))
            apparent += stat.st_size
            allocated += stat.st_blocks * 512
            files += 1
    return apparent, allocated, files


def _payload_per_row(cache: Path) -> int:
    from cache_schema import ArraySpec

    manifest = json.loads((cache / "manifest.json").read_text())
    return sum(ArraySpec.from_dict(spec).row_bytes for spec in manifest["arrays"].values())


# ---------------------------------------------------------------------------------------------------- verdicts

@dataclass
class Result:
    item: int
    key: str
    label: str
    value: float | None
    unit: str
    target: str = ""            # "<= 1.10", ">= 3.5", ... ; empty = informational
    device: str = "-"
    reason: str = ""            # why a target was missed (likely cause), filled only on a miss
    details: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if not self.target or self.value is None:
            return "info"
        op, bound = self.target.split()
        bound = float(bound)
        ok = {"<=": self.value <= bound, ">=": self.value >= bound, "<": self.value < bound}[op]
        return "pass" if ok else "MISS"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        if self.verdict != "MISS":
            data["reason"] = ""
        return data


def stage2_results(device: str, shapes: Shapes, timing: dict, memory: dict) -> list[Result]:
    overhead, live = timing["overhead_seconds"], timing["live_seconds"]
    med = {v: median(overhead[v] if v in overhead else live[v]) for v in VARIANTS}
    cuda = device.startswith("cuda")
    mem_key = "peak_gpu_allocated_bytes" if cuda else "peak_anon_rss_bytes"
    mem = {v: memory[v][mem_key] if v in memory else None for v in VARIANTS}
    unit_mem = "GPU max allocated" if cuda else "peak anonymous RSS"
    fetch = median(timing["fetch_seconds"])
    rows_mb = teacher_batch_bytes(shapes) / 1e6
    gates_mb = timing["gate_parameters"] * 4 * 3 / 1e6   # weights, grads, momentum
    details = {"median_step_seconds": med, mem_key: mem, "cache_fetch_seconds": fetch, "rounds": timing["rounds"],
               "warmup": timing["warmup"], "memory_steps": next(iter(memory.values()))["steps"],
               "gate_parameters": timing["gate_parameters"]}

    def share(a, b):
        return mem[a] / mem[b] if mem[a] is not None and mem[b] is not None else None

    def gb(variant):
        return f"{mem[variant] / 1e9:.2f} GB" if mem[variant] is not None else "not measured"

    live_cached = median(live["cached"])
    teachers = {v: median(live[v]) - live_cached for v in ("live-nograd", "live-official")}
    return [
        Result(1, "stage2_time_overhead", "stage-2 step, all caches / student-only (time)",
               ratio(overhead["cached"], overhead["student"]), "x", "<= 1.10", device,
               f"{med['cached']:.2f} s vs {med['student']:.2f} s: the cached step adds the cache fetch "
               f"({fetch * 1e3:.0f} ms), the gates and the L_VAC terms over {shapes.layers} layers x "
               f"{len(VISION_AGENTS)} agents, which the student-only step (CE only) does not compute", details),
        Result(1, "stage2_memory_overhead", f"stage-2 step, all caches / student-only ({unit_mem})",
               share("cached", "student"), "x", "<= 1.10", device,
               f"{gb('cached')} vs {gb('student')}: the cached step holds the batch's agent rows "
               f"({rows_mb:.0f} MB, fp16 as cached), the gates' weights, grads and momentum ({gates_mb:.0f} MB: "
               f"12 MLP gates with 256 hidden units on 4 x 768 inputs) and the L_VAC graph over every block's "
               f"patch tokens",
               details),
        Result(2, "live_official_speedup", "live teachers, official style (autograd) / cached (time)",
               ratio(live["live-official"], live["cached"]), "x", ">= 3.5", device,
               f"the four teachers' forward + backward added {teachers['live-official']:.2f} s to a "
               f"{live_cached:.2f} s step: the student step is the larger cost on this device", details),
        Result(2, "live_nograd_speedup", "live teachers under no_grad / cached (time)",
               ratio(live["live-nograd"], live["cached"]), "x", ">= 1.6", device,
               f"the four no_grad teacher forwards added {teachers['live-nograd']:.2f} s to a {live_cached:.2f} s "
               "step (a target of 1.6 needs 0.6 of a step)", details),
        Result(2, "cached_vs_official_memory", f"cached / live official-style ({unit_mem})",
               share("cached", "live-official"), "x", "<= 0.55", device,
               f"{gb('cached')} vs {gb('live-official')}: the student's own weights and activations dominate both",
               details),
    ]


def extraction_results(device: str, extraction: dict) -> list[Result]:
    rows = extraction["rows"]
    extract_rate = [rows / s for s in extraction["extract_steady_seconds"]]
    forward_rate = [rows / s for s in extraction["forward_seconds"]]
    details = {"rows": rows, "batch": extraction["batch"], "extract_rows_per_second": median(extract_rate),
               "forward_rows_per_second": median(forward_rate),
               "model_build_seconds": median(extraction["model_build_seconds"]),
               "end_to_end_rows_per_second": median(rows / s for s in extraction["extract_seconds"])}
    overhead_ms = 1e3 * (1 / details["extract_rows_per_second"] - 1 / details["forward_rows_per_second"])
    return [Result(3, "extract_vs_forward", "extract images/s (dino) / bare forward images/s",
                   ratio(extract_rate, forward_rate), "x", ">= 0.9", device,
                   f"{overhead_ms:.0f} ms of CPU work per row around the forward: image decoding and cropping, "
                   "token normalisation, the fp16 conversion (numpy astype), sha256 checksums and writes of "
                   f"{extraction['row_bytes'] / 1e6:.2g} MB rows, and per-run costs (creating and finalising the "
                   f"cache, freeing the agent) over {rows} rows; " +
                   ("the GPU forward is fast next to this CPU work" if device.startswith("cuda") else
                    "on a CPU-only machine the background writer shares the cores the forward uses, so its work "
                    "adds to the forward instead of overlapping it"),
                   details)]


def repeat_results(repeat: dict) -> list[Result]:
    details = {k: v for k, v in repeat.items() if not k.endswith("output")}
    details["help_median_seconds"] = median(repeat["help_seconds"])
    loaded = repeat["torch_imported"] or repeat["transformers_imported"]
    return [
        Result(3, "repeat_extract_seconds", f"repeat `extract`, complete cache ({repeat['agents']} agents), "
               "fresh process", median(repeat["again_seconds"]), "s", "< 3", "cpu",
               f"Python start-up and CLI imports: `transagent --help` alone takes "
               f"{details['help_median_seconds']:.2f} s here", details),
        Result(3, "repeat_extract_model_loaded", "repeat `extract` imported torch or transformers",
               float(loaded), "flag", "<= 0", "cpu",
               "a complete cache must be recognised from its JSON files alone, before any model code", details),
    ]


def read_results(reads: dict) -> list[Result]:
    why = {"zarr": "each row is its own chunk file: one open + read per row, where the plain memmap is one "
                   "mapping of one file",
           "hdf5": "rows of several segments are gathered per segment; the plain memmap is a single fancy index"}
    out = []
    for backend in ("zarr", "hdf5"):
        times = reads[backend]
        details = {"reader_ms": median(times["reader"]) * 1e3, "memmap_ms": median(times["memmap"]) * 1e3,
                   "reader_MB_per_s": reads["batch_bytes"] / median(times["reader"]) / 1e6,
                   "memmap_MB_per_s": reads["batch_bytes"] / median(times["memmap"]) / 1e6,
                   "batch_bytes": reads["batch_bytes"], "batches": len(times["reader"])}
        out.append(Result(4, f"cache_read_{backend}", f"stage-2 reader ({backend}) / np.memmap throughput",
                          ratio(times["memmap"], times["reader"]), "x", ">= 0.5", "cpu",
                          f"{details['reader_ms']:.2f} ms vs {details['memmap_ms']:.2f} ms per batch: {why[backend]}",
                          details))
    return out


def scaling_results(table: list[dict], real_row_bytes: int | None) -> list[Result]:
    out = [Result(5, f"scaling_{row['rows']}", f"tiny dino: {row['rows']} rows", row["seconds"], "s",
                  details=row) for row in table]
    if real_row_bytes:
        out.append(Result(5, "real_row_bytes", "ViT-B/16 vision row (fp16 tokens + fp32 means + view)",
                          real_row_bytes, "B"))
    return out


# ---------------------------------------------------------------------------------------------------- report

def format_table(results: list[Result]) -> str:
    lines = [f"{'#':<2} {'measure':<68} {'device':<6} {'value':>10} {'target':>8}  verdict",
             "-" * 106]
    for r in results:
        if r.item == 5:
            continue
        lines.append(f"{r.item:<2} {r.label[:68]:<68} {r.device:<6} {_format_value(r):>10} "
                     f"{'no' if r.unit == 'flag' else r.target:>8}  {r.verdict}")
    scaling_rows = [r for r in results if r.item == 5 and r.key.startswith("scaling_")]
    if scaling_rows:
        lines += ["", "5  scaling, tiny dino agent (N/4 images x 4 views, zarr):",
                  f"   {'rows':>7} {'seconds':>9} {'rows/s':>8} {'MB':>9} {'MB on disk':>11} {'files':>7} "
                  f"{'B/row':>7} {'disk B/row':>10} {'payload B/row':>13}"]
        for r in scaling_rows:
            d = r.details
            lines.append(f"   {d['rows']:>7} {d['seconds']:>9.2f} {d['rows_per_second']:>8.0f} "
                         f"{d['bytes'] / 1e6:>9.2f} {d['bytes_on_disk'] / 1e6:>11.2f} {d['files']:>7} "
                         f"{d['bytes_per_row']:>7.0f} {d['disk_bytes_per_row']:>10.0f} "
                         f"{d['payload_bytes_per_row']:>13}")
    real = [r for r in results if r.key == "real_row_bytes"]
    if real:
        lines.append(f"   a ViT-B/16 vision row (12 x 196 x 768 fp16 + means + view) is {real[0].value / 1e6:.2f} MB")
    for r in results:
        if r.key == "stage2_time_overhead":
            step, peak = r.details["median_step_seconds"], r.details.get("peak_anon_rss_bytes") or \
                r.details.get("peak_gpu_allocated_bytes") or {}
            cells = [f"{v} {step[v]:.2f} s" + (f" / {peak[v] / 1e9:.2f} GB" if peak.get(v) else "")
                     for v in VARIANTS]
            lines.append(f"\n1-2 [{r.device}] median step / peak memory: " + ", ".join(cells))
    misses = [r for r in results if r.verdict == "MISS"]
    if misses:
        lines += ["", "Missed targets (likely reason):"]
        lines += [f"  - [{r.device}] {r.label}: {_format_value(r)} vs {r.target}. {r.reason}" for r in misses]
    return "\n".join(lines)


def _format_value(r: Result) -> str:
    if r.value is None:
        return "-"
    if r.unit == "flag":
        return "yes" if r.value else "no"
    return f"{r.value:.2f}{r.unit}" if r.unit in ("x", "s") else f"{r.value:g}"


def run_bench(plan_name: str = "full", output: Path = Path("bench/results.json"), work_dir: Path | None = None,
              devices: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every measurement of the plan, write `output` (JSON) and return it; `log` gets progress lines."""
    import tempfile

    import torch

    plan = PLANS[plan_name]
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    phases: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="transagent-bench-", dir=work_dir))

    def phase(name, function, *args):
        log(f"[bench {time.perf_counter() - started:6.0f} s] {name} ...")
        start = time.perf_counter()
        value = function(*args)
        phases[name] = round(time.perf_counter() - start, 2)
        return value

    info = machine()
    results: list[Result] = []
    raw: dict = {}
    try:
        register_tiny(plan.shapes)
        cache_root = scratch / "caches"
        caches = phase("write synthetic caches", write_synthetic_caches, cache_root, plan.shapes, plan.cache_rows)
        for device in devices:
            run_dir = scratch / f"runs-{device}"
            run_dir.mkdir(parents=True, exist_ok=True)
            memory = phase(f"memory per variant, fresh processes ({device})", memory_in_fresh_processes, plan,
                           cache_root, device, run_dir)
            timing = phase(f"stage-2 steps, interleaved ({device})", stage2_timing, plan, cache_root, device,
                           run_dir)
            raw[f"stage2_{device}"] = {"timing": timing, "memory": memory}
            results += stage2_results(device, plan.shapes, timing, memory)
            extraction = phase(f"extraction vs forward ({device})", extraction_vs_forward, plan,
                               scratch / f"extract-{device}", device)
            raw[f"extraction_{device}"] = extraction
            results += extraction_results(device, extraction)
        repeat = phase("repeat extract", repeat_extract, plan, scratch / "repeat")
        raw["repeat_extract"] = repeat
        results += repeat_results(repeat)
        reads = phase("cache reads", cache_reads, plan, caches["dino"], scratch / "reads")
        raw["cache_reads"] = reads
        results += read_results(reads)
        table = phase("scaling", scaling, plan, scratch / "scaling")
        raw["scaling"] = table
        real_row = _payload_per_row(caches["dino"]) if plan.shapes.real else None
        results += scaling_results(table, real_row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_average_at_end"] = _load_average()
    report = {"schema": 1, "plan": plan.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "seconds": round(time.perf_counter() - started, 1), "phase_seconds": phases, "machine": info,
              "shapes": plan.shapes.describe(), "settings": dataclasses.asdict(plan) | {"devices": devices},
              "results": [r.to_dict() for r in results], "raw": raw, "table": format_table(results)}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    os.replace(temporary, output)
    return report


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")

"""What a bench run measures and at which shapes: the agents, the variants, the plans (full, quick, smoke)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
    reps: int                    # rounds of every interleaved comparison (>= MIN_REPETITIONS but in "smoke")
    warmup: int                  # calls of each variant before its timed rounds
    memory_steps: int            # timed steps of each fresh memory process, after one warm-up step
    cache_rows: int              # rows per synthetic cache of the stage-2 steps
    loader_steps: int            # steps per epoch of the loader comparison
    extract_rows: int            # rows (= images x 2 views) per extraction
    extract_batch: int
    read_rows: int               # rows of the cache the reads draw from: a real cache's count of row files
    read_batches: int            # batches per reader per round
    scaling_rows: tuple[int, ...]
    repeat_runs: int             # fresh `extract` processes over a complete cache
    memory_variants: tuple[str, ...] = ("student", "cached", "live-official")
    row_costs: bool = True       # extraction's CPU work per row by stage (ms; pipelines.bench.extraction_rows)


PLANS = {
    "full": Plan("full", VIT_B16, reps=5, warmup=1, memory_steps=5, cache_rows=32, loader_steps=3, extract_rows=64,
                 extract_batch=8, read_rows=1280, read_batches=20, scaling_rows=(100, 1_000, 10_000), repeat_runs=5),
    "quick": Plan("quick", VIT_B16, reps=5, warmup=1, memory_steps=5, cache_rows=8, loader_steps=2, extract_rows=32,
                  extract_batch=8, read_rows=1024, read_batches=10, scaling_rows=(100, 1_000), repeat_runs=5,
                  memory_variants=("student", "cached")),
    # tiny shapes, everything once: the harness's own test (tests/test_bench.py)
    "smoke": Plan("smoke", TINY, reps=1, warmup=0, memory_steps=1, cache_rows=8, loader_steps=2, extract_rows=4,
                  extract_batch=2, read_rows=16, read_batches=2, scaling_rows=(8, 16), repeat_runs=1,
                  memory_variants=("cached",), row_costs=False),
}

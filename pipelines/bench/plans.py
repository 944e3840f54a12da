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

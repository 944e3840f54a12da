"""Turn (dataset, protocol, shots, seeds, preset, agents) into stage-1 jobs: one ExtractContext per agent and class set."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.presets import resolve_agents, student_spec
from pipelines.protocols import training_class_set, training_set

VISION_ROW_EXTRAS = 4 * 5  # views row (int32 x 5)


@dataclass
class ExtractOptions:
    dataset: str = "eurosat"
    data_root: Path = Path("data")
    cache_root: Path = Path("cache")
    preset: str = "paper"
    agents: str = "all"
    protocols: tuple[str, ...] = ("base2novel",)
    shots: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (1,)
    views: int = 4
    view_seed: int = 0
    layers: tuple[int, ...] | None = None
    token_pool: int = 1
    dtype: str = "float16"
    batch_size: int = 16
    device: str = "cpu"
    backend: str = "zarr"
    agent_paths: dict[str, str] = field(default_factory=dict)
    agent_options: dict[str, dict] = field(default_factory=dict)


def student_info(preset: str):
    from extract.agents.base import StudentInfo

    spec = student_spec(preset)
    return StudentInfo(spec.model, spec.pretrained, spec.image_size, spec.patch_size, spec.width, spec.layers)


def build_jobs(options: ExtractOptions, dataset=None) -> list:
    """Jobs in a stable order: per agent, one job per class set it needs (t2i scores depend on the class set)."""
    from cache_schema.views import ViewSpec
    from extract.agents import registry
    from extract.agents.base import LoadRequest, Source
    from extract.families import ExtractContext
    from extract.runner import AgentJob
    from pipelines.datasets import load_dataset

    dataset = dataset or load_dataset(options.dataset, options.data_root)
    agents = registry()
    student = student_info(options.preset)
    keys_by_class_set: dict[str, set[str]] = {}
    for protocol in options.protocols:
        for shots in options.shots:
            for seed in options.seeds:
                chosen = training_set(dataset, protocol, shots, seed, options.data_root)
                keys_by_class_set.setdefault(chosen.class_set, set()).update(chosen.keys)
    all_keys = sorted(set().union(*keys_by_class_set.values())) if keys_by_class_set else []
    jobs = []
    for name in resolve_agents(options.agents, tuple(agents)):
        spec = agents[name]
        agent_options = {**default_agent_options(dataset, name), **options.agent_options.get(name, {})}
        base_ctx = ExtractContext(
            dataset=options.dataset, split_hash=dataset.split_hash, image_root=dataset.image_root, keys=all_keys,
            classnames=list(dataset.classnames), template=dataset.template, student=student, class_set="all",
            views=options.views, view_spec=ViewSpec(seed=options.view_seed), layers=options.layers,
            token_pool=options.token_pool, dtype=options.dtype, batch_size=options.batch_size, device=options.device,
            options=agent_options)
        source = Source(local_path=options.agent_paths[name]) if name in options.agent_paths else None
        request = LoadRequest(tiny=options.preset == "tiny", student=student, device=options.device,
                              dtype="float16" if options.device.startswith("cuda") else "float32", source=source,
                              options=agent_options)
        if spec.family == "t2i":  # one cache per class set, each over the images that class set trains on
            for class_set, keys in sorted(keys_by_class_set.items()):
                classnames = class_subset(dataset.classnames, class_set)
                jobs.append(AgentJob(spec, replace(base_ctx, keys=sorted(keys), classnames=classnames,
                                                   class_set=class_set), request))
        else:
            jobs.append(AgentJob(spec, base_ctx, request))
    return jobs


def default_agent_options(dataset, agent: str) -> dict:
    """Agent inputs that live with the dataset: `<dataset dir>/descriptions/<agent>.json` (CuPL/ProText format)."""
    descriptions = Path(dataset.root) / "descriptions" / f"{agent}.json"
    return {"descriptions": str(descriptions)} if descriptions.exists() else {}


def class_subset(classnames: list[str], class_set: str) -> list[str]:
    half = math.ceil(len(classnames) / 2)
    return {"all": list(classnames), "base": list(classnames[:half]), "novel": list(classnames[half:])}[class_set]


def estimate_bytes(jobs: list) -> dict[str, int]:
    """Bytes each job will add (vision tokens dominate); computed from shapes alone, before any model loads."""
    sizes = {}
    for job in jobs:
        ctx = job.ctx
        key = f"{job.spec.name}[{ctx.class_set}]" if job.spec.family == "t2i" else job.spec.name
        if job.spec.family == "vision":
            layers = len(ctx.layers) if ctx.layers else ctx.student.layers
            tokens = (ctx.student.grid // ctx.token_pool) ** 2
            width = ctx.student.width
            item = 1 if ctx.dtype == "int8" else (2 if ctx.dtype == "float16" else 4)
            per_row = layers * tokens * width * item + layers * width * 4 + VISION_ROW_EXTRAS
            if ctx.dtype == "int8":
                per_row += layers * tokens * 4
            sizes[key] = per_row * len(ctx.keys) * ctx.views
        elif job.spec.family in ("t2i", "i2t"):
            sizes[key] = len(ctx.keys) * len(ctx.classnames) * 4 * 4
        else:
            sizes[key] = len(ctx.classnames) * 4096 * 4
    return sizes


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"

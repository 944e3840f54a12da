"""Turn (dataset, protocol, shots, seeds, preset, agents) into stage-1 jobs: one ExtractContext per agent and class
set; what they will write, and the limit it must stay under."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

from cache_schema.views import ViewSpec
from extract.agents import registry
from extract.agents.base import LoadRequest, Source
from extract.families import ExtractContext
from extract.runner import AgentJob, is_complete, local_weights, planned_path
from pipelines.config.extract import ExtractOptions
from pipelines.datasets import dataset_slug, load_dataset
from pipelines.devices import compute_dtype
from pipelines.presets import resolve_agents, student_spec
from pipelines.protocols import training_set
from pipelines.texts import check_settings, plan_texts

log = logging.getLogger(__name__)

VISION_ROW_EXTRAS = 4 * 5     # views row (int32 x 5)
T2I_MAX_RESOLUTIONS = 3       # SD v1.4 at 512 px: 16², 32², 64² latent grids; PixArt has one
I2T_MAX_FEATURE_DIM = 4096    # image_features: BLIP-2 OPT-2.7b 2560, Shikra (LLaMA-7B) 4096
LANGUAGE_MAX_DIM = 4096       # class_features: CLIP text 512, MiniLM 384; room for larger encoders
WEIGHTS_MEMO = ".weights-sha256.json"   # under the cache root: digests of local weight files by (path, size, mtime)


def build_jobs(options: ExtractOptions, dataset=None, skipped: dict | None = None) -> list:
    """Jobs in a stable order: per agent, one job per class set it needs (t2i scores depend on the class set); sd
    after vicuna, whose descriptions it may read. One line is logged per agent skipped or text choice made;
    `skipped`, when given, collects the agents left out (name -> why) instead."""
    # Images are checked later, and only those the jobs need (`--on-error` decides what a bad one does).
    dataset = dataset or load_dataset(options.dataset, options.data_root, verify=False)
    slug = dataset_slug(options.dataset, options.dataset_name)
    agents = registry()
    check_agent_options(options, agents)
    files = dict(options.descriptions)
    check_settings(options.agent_settings, tuple(agents), files)
    student = student_spec(options.preset)
    # Planning needs no torch, so `auto` plans on the CPU; `extract_dataset` moves the jobs it runs to the device
    # it resolved and checked.
    device = "cpu" if options.device == "auto" else options.device
    keys_by_class_set: dict[str, set[str]] = {}
    for protocol in options.protocols:
        for shots in options.shots:
            for seed in options.seeds:
                chosen = training_set(dataset, protocol, shots, seed, options.data_root)
                keys_by_class_set.setdefault(chosen.class_set, set()).update(chosen.keys)
    all_keys = sorted(set().union(*keys_by_class_set.values())) if keys_by_class_set else []
    names = resolve_agents(options.agents, tuple(agents))
    if "sd" in names and "vicuna" in names:
        names.remove("vicuna")
        names.insert(names.index("sd"), "vicuna")
    jobs = []
    for name in names:
        spec = agents[name]
        plan = plan_texts(dataset, name, files, options.agent_settings)
        if plan.skip:
            if skipped is None:
                log.info("%s", plan.skip)
            else:
                skipped[name] = plan.skip.removeprefix(f"{name}: ").removeprefix("skipped, ")
            continue
        if plan.note:
            log.info("%s", plan.note)
        if plan.from_vicuna_cache:
            plan.options = _vicuna_cache_conditioning(options, dataset, plan, jobs)
        agent_options = dict(plan.options)
        base_ctx = ExtractContext(
            dataset=slug, split_hash=dataset.split_hash, dataset_fields=dataset.fingerprint_fields(slug),
            image_root=dataset.image_root, keys=all_keys,
            classnames=list(dataset.classnames), template=plan.template, student=student, class_set="all",
            views=options.views, view_spec=ViewSpec(seed=options.view_seed), layers=options.layers,
            token_pool=options.token_pool, dtype=options.dtype, batch_size=options.batch_size, device=device,
            options=agent_options)
        source, weights = agent_weights(spec, options)
        request = LoadRequest(tiny=options.preset == "tiny", student=student, device=device,
                              dtype=compute_dtype(device), source=source,
                              options=agent_options)
        if spec.family == "t2i":  # one cache per class set, each over the images that class set trains on
            for class_set, keys in sorted(keys_by_class_set.items()):
                classnames = class_subset(dataset.classnames, class_set)
                jobs.append(AgentJob(spec, replace(base_ctx, keys=sorted(keys), classnames=classnames,
                                                   class_set=class_set), request, weights))
        else:
            jobs.append(AgentJob(spec, base_ctx, request, weights))
    return jobs


def _vicuna_cache_conditioning(options: ExtractOptions, dataset, plan, jobs: list) -> dict:
    """sd on the descriptions vicuna generates: they will be in vicuna's cache, whose fingerprint sd's chains. If
    vicuna is neither extracted in this run nor complete in the cache, sd conditions on the template."""
    vicuna = next((job for job in jobs if job.spec.name == "vicuna"), None)
    if vicuna is None:
        vicuna = build_jobs(replace(options, agents="vicuna"), dataset)[0]
        if not is_complete(vicuna, options.cache_root):
            log.info("sd: no vicuna descriptions (vicuna generates them and is neither extracted here nor in the "
                     "cache); conditioning on the template %r", plan.template)
            return {"conditioning": "template"}
    path = planned_path(vicuna, options.cache_root)
    return {**plan.options, "vicuna_cache": path.name, "descriptions": str(path / "files" / "descriptions.json")}


def agent_weights(spec, options: ExtractOptions) -> tuple:
    """(source, identity) of an agent's real weights: a --agent-path directory (identified by its files' sha256),
    or a published checkpoint converted under the weights root (identified by the checkpoint's sha256, known from
    its pin without a download); (None, None) for hub agents and the tiny preset."""
    if spec.name in options.agent_paths:
        source = Source(local_path=str(options.agent_paths[spec.name]))
        return source, local_weights(source.local_path, Path(options.cache_root) / WEIGHTS_MEMO)
    if options.preset == "tiny" or spec.source.url is None:
        return None, None
    from extract.weights import checkpoint

    planned = checkpoint(spec, options.cache_root)
    return Source(local_path=str(planned.converted)), planned.identity()


def downloads_weights(job, options: ExtractOptions) -> bool:
    """True if the job loads a published checkpoint that `agents check` downloads and converts first."""
    return not job.request.tiny and job.spec.source.url is not None and job.spec.name not in options.agent_paths


def skipped_agents(options: ExtractOptions, agents) -> dict[str, str]:
    """Selected agents that cannot run as configured, and why: weights that need a manual step (a licence) and no
    --agent-path. Extraction reports them in one line and goes on; --strict makes any skip an error."""
    if options.preset == "tiny":
        return {}
    return {name: agents[name].manual_weights for name in resolve_agents(options.agents, tuple(agents))
            if agents[name].manual_weights and name not in options.agent_paths}


def check_agent_options(options: ExtractOptions, agents) -> None:
    """Per-agent flags must name known agents, and local weights must exist (checked before anything loads)."""
    for flag, given in (("--agent-path", options.agent_paths), ("--descriptions", options.descriptions)):
        unknown = sorted(set(given) - set(agents))
        if unknown:
            raise ValueError(f"{flag} {', '.join(unknown)}: unknown agent(s); known agents: {', '.join(agents)}")
    if options.agent_paths and options.preset == "tiny":
        raise ValueError("--agent-path loads real weights, but --preset tiny builds every agent from its tiny "
                         "config; use --preset paper")
    for name, path in sorted(options.agent_paths.items()):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--agent-path {name}={path}: no such directory (a transformers-format model "
                                    f"directory; `transagent agents convert` writes one for vitdet and shikra)")


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
        elif job.spec.family == "t2i":
            sizes[key] = len(ctx.keys) * T2I_MAX_RESOLUTIONS * len(ctx.classnames) * 4
        elif job.spec.family == "i2t":  # scores [N, C] + image_features [N, d], float32
            sizes[key] = len(ctx.keys) * (len(ctx.classnames) + I2T_MAX_FEATURE_DIM) * 4
        else:
            sizes[key] = len(ctx.classnames) * LANGUAGE_MAX_DIM * 4
    return sizes


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


class SizeLimitError(ValueError):
    """The caches would exceed --max-bytes; the message says how to shrink them."""


def check_size(sizes: dict[str, int], max_bytes: float) -> None:
    """The whole extraction must stay under the limit, checked from shapes before anything is written."""
    total = sum(sizes.values())
    if total > max_bytes:
        raise SizeLimitError(
            f"the estimate {format_bytes(total)} exceeds --max-bytes {format_bytes(max_bytes)}; shrink it with "
            "--views (fewer views), --layers (e.g. 3,7,11), --token-pool 2 (7x7 grid), --dtype int8 (per-token "
            "scale), or raise --max-bytes")

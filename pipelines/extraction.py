"""Turn (dataset, protocol, shots, seeds, preset, agents) into stage-1 jobs: one ExtractContext per agent and class set."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.presets import resolve_agents, student_spec
from pipelines.protocols import training_set

VISION_ROW_EXTRAS = 4 * 5     # views row (int32 x 5)
T2I_MAX_RESOLUTIONS = 3       # SD v1.4 at 512 px: 16², 32², 64² latent grids; PixArt has one
I2T_MAX_FEATURE_DIM = 4096    # image_features: BLIP-2 OPT-2.7b 2560, Shikra (LLaMA-7B) 4096
LANGUAGE_MAX_DIM = 4096       # class_features: CLIP text 512, MiniLM 384; room for larger encoders
WEIGHTS_MEMO = ".weights-sha256.json"   # under the cache root: digests of local weight files by (path, size, mtime)


@dataclass
class ExtractOptions:
    dataset: str = "eurosat"
    dataset_name: str | None = None    # --dataset-name: directory name of a folder dataset (default: its slug)
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
    agent_options: dict[str, dict] = field(default_factory=dict)    # {agent: {"descriptions": FILE}}
    agent_settings: dict[str, dict] = field(default_factory=dict)   # --agent-option AGENT:KEY=VALUE (pipelines.texts)


def build_jobs(options: ExtractOptions, dataset=None, echo=lambda line: None, skipped: dict | None = None) -> list:
    """Jobs in a stable order: per agent, one job per class set it needs (t2i scores depend on the class set); sd
    after vicuna, whose descriptions it may read. `echo` gets one line per agent skipped or text choice made;
    `skipped`, when given, collects the agents left out (name -> why) instead."""
    from cache_schema.views import ViewSpec
    from extract.agents import registry
    from extract.agents.base import LoadRequest
    from extract.families import ExtractContext
    from extract.runner import AgentJob
    from pipelines.datasets import dataset_slug, load_dataset
    from pipelines.texts import check_settings, plan_texts

    # Images are checked later, and only those the jobs need (`--on-error` decides what a bad one does).
    dataset = dataset or load_dataset(options.dataset, options.data_root, verify=False)
    slug = dataset_slug(options.dataset, options.dataset_name)
    agents = registry()
    check_agent_options(options, agents)
    files = {name: given["descriptions"] for name, given in options.agent_options.items() if "descriptions" in given}
    check_settings(options.agent_settings, tuple(agents), files)
    student = student_spec(options.preset)
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
                echo(plan.skip)
            else:
                skipped[name] = plan.skip.removeprefix(f"{name}: ").removeprefix("skipped, ")
            continue
        if plan.note:
            echo(plan.note)
        if plan.from_vicuna_cache:
            plan.options = _vicuna_cache_conditioning(options, dataset, plan, jobs, echo)
        agent_options = {**plan.options, **{key: value for key, value in options.agent_options.get(name, {}).items()
                                            if key != "descriptions"}}
        base_ctx = ExtractContext(
            dataset=slug, split_hash=dataset.split_hash, dataset_fields=dataset.fingerprint_fields(slug),
            image_root=dataset.image_root, keys=all_keys,
            classnames=list(dataset.classnames), template=plan.template, student=student, class_set="all",
            views=options.views, view_spec=ViewSpec(seed=options.view_seed), layers=options.layers,
            token_pool=options.token_pool, dtype=options.dtype, batch_size=options.batch_size, device=options.device,
            options=agent_options)
        source, weights = agent_weights(spec, options)
        request = LoadRequest(tiny=options.preset == "tiny", student=student, device=options.device,
                              dtype="float16" if options.device.startswith("cuda") else "float32", source=source,
                              options=agent_options)
        if spec.family == "t2i":  # one cache per class set, each over the images that class set trains on
            for class_set, keys in sorted(keys_by_class_set.items()):
                classnames = class_subset(dataset.classnames, class_set)
                jobs.append(AgentJob(spec, replace(base_ctx, keys=sorted(keys), classnames=classnames,
                                                   class_set=class_set), request, weights))
        else:
            jobs.append(AgentJob(spec, base_ctx, request, weights))
    return jobs


def _vicuna_cache_conditioning(options: ExtractOptions, dataset, plan, jobs: list, echo) -> dict:
    """sd on the descriptions vicuna generates: they will be in vicuna's cache, whose fingerprint sd's chains. If
    vicuna is neither extracted in this run nor complete in the cache, sd conditions on the template."""
    from extract.runner import is_complete, planned_path

    vicuna = next((job for job in jobs if job.spec.name == "vicuna"), None)
    if vicuna is None:
        vicuna = build_jobs(replace(options, agents="vicuna"), dataset)[0]
        if not is_complete(vicuna, options.cache_root):
            echo(f"sd: no vicuna descriptions (vicuna generates them and is neither extracted here nor in the "
                 f"cache); conditioning on the template {plan.template!r}")
            return {"conditioning": "template"}
    path = planned_path(vicuna, options.cache_root)
    return {**plan.options, "vicuna_cache": path.name, "descriptions": str(path / "files" / "descriptions.json")}


def agent_weights(spec, options: ExtractOptions) -> tuple:
    """(source, identity) of an agent's real weights: a --agent-path directory (identified by its files' sha256),
    or a published checkpoint converted under the weights root (identified by the checkpoint's sha256, known from
    its pin without a download); (None, None) for hub agents and the tiny preset."""
    from extract.agents.base import Source
    from extract.runner import local_weights

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
    for flag, given in (("--agent-path", options.agent_paths), ("--descriptions", options.agent_options)):
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

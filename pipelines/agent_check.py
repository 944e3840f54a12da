"""`agents check`, the preflight: every selected agent loaded as extraction would load it, one at a time, and a row
per agent (source, resolved commit, parameters, dtype, allowed missing/unexpected keys, weights sha256, device
memory, the cache it would write). `transagent extract` runs it for the agents whose caches are incomplete."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from extract.agents import LoadRequest, registry
from extract.preflight import CheckResult, check_agent, describe_source
from extract.weights import prepare
from pipelines.extraction import (
    ExtractOptions,
    agent_weights,
    build_jobs,
    check_agent_options,
    downloads_weights,
    estimate_bytes,
    format_bytes,
    skipped_agents,
)
from pipelines.presets import resolve_agents, student_spec


@dataclass
class CheckItem:
    spec: object
    request: object
    weights: dict | None = None
    ctx: object = None               # the first job's context (a --forward batch reads its rows)
    cache_bytes: int | None = None
    downloads: bool = False          # a published checkpoint to download and convert before loading


def items_from_jobs(jobs: list, options: ExtractOptions) -> list[CheckItem]:
    """One item per agent (t2i agents have a job per class set; their cache sizes add up)."""
    items: dict[str, CheckItem] = {}
    for job in jobs:
        item = items.setdefault(job.spec.name, CheckItem(job.spec, job.request, job.weights, job.ctx, 0,
                                                         downloads_weights(job, options)))
        item.cache_bytes += sum(estimate_bytes([job]).values())
    return list(items.values())


def plan(options: ExtractOptions, with_dataset: bool) -> tuple[list[CheckItem], dict[str, str]]:
    """(items to check, skipped agents and why). Without a dataset nothing is estimated and no batch can run."""
    agents = registry()
    skipped = skipped_agents(options, agents)
    if with_dataset:
        jobs = [job for job in build_jobs(options) if job.spec.name not in skipped]
        return items_from_jobs(jobs, options), skipped
    check_agent_options(options, agents)
    student = student_spec(options.preset)
    items = []
    for name in resolve_agents(options.agents, tuple(agents)):
        if name in skipped:
            continue
        spec = agents[name]
        source, weights = agent_weights(spec, options)
        request = LoadRequest(tiny=options.preset == "tiny", student=student, device=options.device,
                              dtype="float16" if options.device.startswith("cuda") else "float32", source=source)
        items.append(CheckItem(spec, request, weights, downloads=not request.tiny and spec.source.url is not None
                               and name not in options.agent_paths))
    return items, skipped


def run_checks(items: list[CheckItem], options: ExtractOptions, forward: bool = False, on_result=None) -> list:
    """Check the items one after another (each agent freed before the next loads), downloading and converting
    published checkpoints first (logged by `extract.weights`); `on_result` gets each row as soon as it is known."""
    results = []
    for item in items:
        result = None
        if item.downloads:
            try:
                item.weights = prepare(item.spec, options.cache_root).identity()
            except (OSError, ValueError) as error:
                result = CheckResult(item.spec.name, "failed", source=describe_source(item.spec, item.request),
                                     device=item.request.device, error=str(error))
        if result is None:
            result = check_agent(item.spec, item.request, weights=item.weights, ctx=item.ctx, forward=forward)
            result.cache_bytes = item.cache_bytes
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def skipped_results(skipped: dict[str, str]) -> list:
    return [CheckResult(name, "skipped", error=reason) for name, reason in skipped.items()]


def summary(results) -> str:
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "failed", "skipped")}
    return f"agents check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"


def format_result(result) -> str:
    """One line per agent; a failure names what to fix."""
    head = f"{result.agent:<7} {result.status:<7}"
    if result.status == "skipped":
        return f"{head} {result.error}"
    if result.status == "failed":
        return f"{head} {result.source}: {result.error}"
    memory = f"{format_bytes(result.weight_bytes)} on {result.device}"
    if result.forward_bytes is not None:
        memory += f" + {format_bytes(result.forward_bytes)} for one batch"
    parts = [
        result.source,
        f"commit {result.commit or '-'}",
        _parameters(result.parameters),
        "/".join(result.dtypes) or "-",
        f"keys {_keys(result)}",
        f"sha256 {_weights_digest(result.weights)}",
        f"memory {memory}",
        f"cache {format_bytes(result.cache_bytes) if result.cache_bytes is not None else '- (no --dataset)'}",
    ]
    return f"{head} " + " | ".join(parts)


def _parameters(count: int) -> str:
    return f"{count / 1e9:.2f} B params" if count >= 1e9 else (
        f"{count / 1e6:.1f} M params" if count >= 1e6 else f"{count:,} params")


def _keys(result) -> str:
    if not result.models:
        return "- (no checkpoint)"
    if not result.missing and not result.unexpected:
        return f"exact ({len(result.models)} model{'s' if len(result.models) > 1 else ''})"
    parts = []
    for kind, keys in (("missing", result.missing), ("unexpected", result.unexpected)):
        if keys:
            parts.append(f"{len(keys)} {kind} allowed ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})")
    return ", ".join(parts)


def _weights_digest(weights: dict) -> str:
    """One file: its sha256. Several: the sha256 of the sorted file -> sha256 list, and the file count."""
    if not weights:
        return "-"
    if len(weights) == 1:
        (name, digest), = weights.items()
        return f"{digest or '(not yet downloaded)'} ({name})"
    combined = hashlib.sha256(json.dumps(sorted(weights.items())).encode()).hexdigest()
    return f"{combined[:16]}... over {len(weights)} files"

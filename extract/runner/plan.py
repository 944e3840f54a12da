"""What a job's cache is and whether it is complete: computable without importing torch or loading a model.

A re-run over complete caches stops here: it reads two JSON files per agent and never imports a model library.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cache_schema import read_json
from cache_schema.fingerprint import sha256_file
from cache_schema.layout import MANIFEST, ROWS, cache_dir, parse_rows, with_schema
from cache_schema.manifest import read_manifest
from extract.agents.base import AgentSpec, LoadRequest
from extract.families import ExtractContext


@dataclass
class AgentJob:
    spec: AgentSpec
    ctx: ExtractContext
    request: LoadRequest
    weights: dict[str, str] | None = None      # sha256 per file of a local weights directory (part of the fingerprint)
    skipped_keys: tuple[str, ...] = ()         # unreadable images left out with --on-error skip


def family_module(family: str):
    return importlib.import_module(f"extract.families.{family}")


def cache_fields(job: AgentJob) -> dict:
    """Everything that changes this agent's numbers. Computable without loading the model."""
    fields = {
        "agent": job.spec.fingerprint_fields(job.request.tiny),
        "dataset": {**(job.ctx.dataset_fields or {"name": job.ctx.dataset}), "split_hash": job.ctx.split_hash},
        "family": family_module(job.spec.family).fingerprint_fields(job.ctx),
    }
    if job.weights is not None:  # a local directory: its content, not its path, is the identity
        fields["agent"] = {**fields["agent"], "local_weights": job.weights}
    return fields


def planned_path(job: AgentJob, cache_root) -> Path:
    return cache_dir(cache_root, job.ctx.dataset, job.spec.name, cache_fields(job))


def needed_rows(job: AgentJob) -> list[tuple[str, int]]:
    return sorted(set(family_module(job.spec.family).rows(job.ctx)))


def is_complete(job: AgentJob, cache_root) -> bool:
    """True if the cache is complete and holds every needed row; reads two JSON files, imports nothing heavy."""
    path = planned_path(job, cache_root)
    if not (path / MANIFEST).exists() or not (path / ROWS).exists():
        return False
    manifest = read_manifest(path / MANIFEST)   # a damaged manifest is an error naming it, not a traceback
    if manifest.get("status") != "complete" or manifest.get("fields") != json.loads(
            json.dumps(with_schema(cache_fields(job)))):
        return False
    present = set(parse_rows(read_json(path / ROWS), path / ROWS))
    return all(row in present for row in needed_rows(job))


def local_weights(directory, memo_file: Path | None = None) -> dict[str, str]:
    """{relative file: sha256} of every file under a local weights directory.

    Hashing a 7B checkpoint takes a minute, so digests are memoised in `memo_file` by (absolute path, size,
    mtime): a repeated `extract` only stats the files."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"local weights directory {directory} does not exist")
    memo = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    digests, changed = {}, False
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = memo.get(key)
        if entry is None or entry[:2] != stamp:
            memo[key] = entry = [*stamp, sha256_file(file)]
            changed = True
        digests[file.relative_to(directory).as_posix()] = entry[2]
    if not digests:
        raise FileNotFoundError(f"local weights directory {directory} is empty")
    if changed and memo_file is not None:
        try:  # an optimisation only: a failed write costs a re-hash next time
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(memo, sort_keys=True))
            os.replace(temporary, memo_file)
        except OSError:
            pass
    return digests

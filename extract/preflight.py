"""The preflight of one agent: load it as extraction would, report what was loaded, free it.

Loading is where real checkpoints go wrong (a hub id that cannot be reached, a checkpoint with tensors missing or
renamed, weights that do not fit the device), so `transagent agents check` and `transagent extract` load every
agent that still has work before any extraction starts, one at a time, instead of failing hours into a run.
"""
from __future__ import annotations

import gc
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cache_schema.fingerprint import sha256_file
from extract.loading import recording
from extract.runner import MemoryMonitor, current_rss, family_module
from extract.runner import empty_device_cache

BLOB_NAME = re.compile(r"^[0-9a-f]{64}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
COLLECT_ABOVE = 256 * 2**20  # bytes of weights above which freeing an agent runs the garbage collector


@dataclass
class CheckResult:
    agent: str
    status: str                                   # "ok" | "failed" | "skipped"
    source: str = ""
    commit: str | None = None                     # the resolved hub commit (None: local, tiny or no hub weights)
    models: list[str] = field(default_factory=list)        # the models loaded from checkpoints (key-checked)
    parameters: int = 0
    dtypes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # allowed missing keys ("Model: key")
    unexpected: list[str] = field(default_factory=list)   # allowed unexpected keys
    weights: dict[str, str | None] = field(default_factory=dict)   # file -> sha256
    weight_bytes: int = 0                         # parameters + buffers, on `device`
    forward_bytes: int | None = None              # extra peak memory of one batch (--forward)
    device: str = "cpu"
    cache_bytes: int | None = None                # what extraction would write for the dataset (estimate)
    seconds: float = 0.0
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def check_agent(spec, request, *, weights: dict | None = None, ctx=None, forward: bool = False,
                source: str | None = None) -> CheckResult:
    """Load `spec` for `request`, measure it, and free it. Any failure becomes a "failed" row (the error is the
    message a user acts on); the next agent is still checked."""
    start = time.perf_counter()
    result = CheckResult(spec.name, "ok", source=source or describe_source(spec, request), device=request.device)
    runtime = None
    try:
        with recording() as loaded:
            runtime = spec.load(request)
            preflight = getattr(runtime, "preflight", None)
            if callable(preflight):  # parts a runtime loads lazily (e.g. Vicuna's LLM when it generates)
                preflight()
        result.parameters, result.weight_bytes, result.dtypes = measure(runtime_modules(runtime))
        result.models = [record.model + (f" ({record.subfolder})" if record.subfolder else "") for record in loaded]
        result.missing = [f"{record.model}: {key}" for record in loaded for key in record.missing]
        result.unexpected = [f"{record.model}: {key}" for record in loaded for key in record.unexpected]
        commits = sorted({record.commit for record in loaded if record.commit})
        result.commit = ",".join(commits) or None
        result.weights = dict(weights) if weights is not None else hub_weights(loaded)
        if forward:
            result.forward_bytes = measure_forward(runtime, spec, ctx, request.device)
    except Exception as error:  # noqa: BLE001 - an agent that cannot run is a row of the report, not a crash
        result.status, result.error = "failed", f"{type(error).__name__}: {error}"
    finally:
        runtime = None
        # a full collection takes ~0.5 s in a large process: worth it to free a device, a failed load's frames or
        # a large model before the next agent loads, not for a tiny one on the CPU
        if request.device.startswith("cuda") or result.status == "failed" or result.weight_bytes > COLLECT_ABOVE:
            gc.collect()
            empty_device_cache(request.device)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def describe_source(spec, request) -> str:
    if request.tiny:
        return f"tiny-random (seed {request.seed})"
    source = request.source or spec.source
    if spec.source.url and request.source is not None and request.source.local_path:
        return f"{spec.source.url} -> {request.source.local_path}"
    return source.describe()


def runtime_modules(runtime) -> list:
    """Every torch module a runtime holds (attributes, and containers or plain objects one or two levels down)."""
    found, seen = [], set()

    def visit(value, depth: int) -> None:
        if isinstance(value, torch.nn.Module):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
            return
        if depth == 0 or isinstance(value, (str, bytes, int, float, type)):
            return
        if isinstance(value, (list, tuple, set)):
            items = value
        elif isinstance(value, dict):
            items = value.values()
        elif hasattr(value, "__dict__"):
            items = vars(value).values()
        else:
            return
        for item in list(items):
            visit(item, depth - 1)

    visit(runtime, 3)
    return found


def measure(modules) -> tuple[int, int, list[str]]:
    """(parameters, bytes of parameters + buffers, dtypes of the parameters), each tensor counted once."""
    params = {id(p): p for module in modules for p in module.parameters()}
    buffers = {id(b): b for module in modules for b in module.buffers()}
    count = sum(p.numel() for p in params.values())
    size = sum(t.numel() * t.element_size() for t in (*params.values(), *buffers.values()))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params.values()})
    return count, size, dtypes


def measure_forward(runtime, spec, ctx, device: str) -> int:
    """Extra peak memory of one batch through the family's compute: CUDA's allocator peak on a GPU, the peak
    resident-set growth on the CPU."""
    if ctx is None:
        raise ValueError("--forward needs a dataset (one batch of its rows)")
    family = family_module(spec.family)
    rows = sorted(set(family.rows(ctx)))[:ctx.batch_size]
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        family.compute(runtime, rows, ctx)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    monitor = MemoryMonitor("cpu")
    before = current_rss()
    monitor.start()
    try:
        family.compute(runtime, rows, ctx)
    finally:
        monitor.stop()
    return max(0, monitor.peak_rss - before)


def hub_weights(loaded) -> dict[str, str]:
    """{file: sha256} of the weight files each loaded model came from: a Hugging Face cache file is named by its
    blob, whose name is the file's sha256; other files are hashed."""
    weights = {}
    for record in loaded:
        if record.directory is None:
            continue
        for path in weight_files(Path(record.directory)):
            name = f"{record.subfolder}/{path.name}" if record.subfolder else path.name
            weights[name] = file_sha256(path)
    return weights


def weight_files(directory: Path) -> list[Path]:
    """The weight files transformers and diffusers load from a directory: safetensors when there are any (the
    loaders prefer them), else the pickled formats; variants such as `*.fp16.safetensors` are not loaded."""
    if not directory.is_dir():
        return []
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and "." not in p.stem)
    return [p for p in files if p.suffix == ".safetensors"] or files


def file_sha256(path: Path) -> str:
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and BLOB_NAME.match(target.name):
        return target.name
    return sha256_file(path)

"""Where an agent's weights come from (`Source`) and what the Hugging Face hub resolved them to.

A leaf of `extract/`: it imports nothing of the package, so every layer above (loading, converters, weights,
families, agents) may use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """Where the real weights come from: a hub id (+ optional pinned revision), a local path, or a published
    checkpoint file (`url`) that `extract.weights` downloads and converts with `extract.convert.<converter>`."""

    hub_id: str | None = None
    revision: str | None = None
    local_path: str | None = None
    note: str = ""
    url: str | None = None
    converter: str | None = None

    def describe(self) -> str:
        if self.local_path is not None:
            return f"local:{self.local_path}"
        if self.url is not None:
            return self.url
        if self.hub_id is None:
            return self.note or "-"
        return self.hub_id + (f"@{self.revision}" if self.revision else "")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_help(agent: str) -> str:
    return (f"Offline routes: pass a local copy with --agent-path {agent}=DIR, or set HF_HUB_OFFLINE=1 with the "
            f"model already in the Hugging Face cache (HF_HOME).")


def hub_commit(source: Source, filename: str = "config.json") -> str | None:
    """The commit a hub download resolved to, read from the Hugging Face cache (transformers 5 no longer puts it on
    the config); None for local paths or when the file is not cached."""
    path = cached_file(source, filename)
    if path is None:
        return None
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def cached_file(source: Source, filename: str) -> str | None:
    """The Hugging Face cache path of one file of a hub source; None for local paths or a file not cached."""
    if source.local_path is not None or source.hub_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache  # ~0.3 s (httpx): not on the CLI's start-up or re-run path

    path = try_to_load_from_cache(source.hub_id, filename, revision=source.revision)
    return path if isinstance(path, str) else None


def files_directory(source: Source, subfolder: str | None, config_file: str) -> str | None:
    """The directory a model's files were read from: the local path, or its hub cache snapshot (None if unknown)."""
    if source.local_path is not None:
        return str(Path(source.local_path) / subfolder) if subfolder else source.local_path
    cached = cached_file(source, config_file)
    return str(Path(cached).parent) if cached else None


def resolved_source(source: Source, filename: str = "config.json") -> dict:
    """What the manifest records about the weights: the source and, for hub downloads, the resolved commit."""
    return {"source": source.describe(), "commit": hub_commit(source, filename)}

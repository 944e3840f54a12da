"""Which caches the runs still use: what `cache gc` keeps. Runs are the application's, so reading them is too;
`cache_schema.gc` only takes the answer."""
from __future__ import annotations

import json
from pathlib import Path


def referenced_caches(cache_root, runs_root) -> set[str] | None:
    """Cache directories (relative to the cache root, POSIX) named by runs' config.json `caches` (a list of
    paths, or {agent: path}); None when no run lists any (then only partial caches are garbage)."""
    runs_root, cache_root = Path(runs_root), Path(cache_root).resolve()
    found, any_run = set(), False
    for config in sorted(runs_root.rglob("config.json")) if runs_root.is_dir() else []:
        try:
            caches = json.loads(config.read_text()).get("caches")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if caches is None:
            continue
        any_run = True
        for entry in caches.values() if isinstance(caches, dict) else caches:
            entry = Path(entry)
            if entry.is_absolute():
                try:
                    entry = entry.resolve().relative_to(cache_root)
                except ValueError:
                    continue
            found.add(entry.as_posix())
    return found if any_run else None

"""Stage 1: run each agent once, one at a time, and write its rows into the cache.

For every agent: work out the rows it needs; if its cache already holds them, skip it without importing torch or
loading a model (`plan`); otherwise check its images open (`inputs`), load it, compute the missing rows in batches
(writes overlap with compute), free it, and only then move on to the next agent (`execution`). A JSON-lines log
next to the caches records rows, seconds, images/s and peak memory per agent (`monitoring`).
"""
from extract.runner.execution import BackgroundWriter, aligned_batches, explain, run, run_agent
from extract.runner.inputs import drop_keys, image_keys, unreadable_images
from extract.runner.monitoring import AgentReport, MemoryMonitor, Progress, current_rss, empty_device_cache, log
from extract.runner.plan import AgentJob, cache_fields, family_module, is_complete, local_weights, needed_rows, \
    planned_path

__all__ = [
    "AgentJob", "AgentReport", "BackgroundWriter", "MemoryMonitor", "Progress", "aligned_batches", "cache_fields",
    "current_rss", "drop_keys", "explain", "family_module", "image_keys", "is_complete", "local_weights", "log",
    "needed_rows", "planned_path", "run", "run_agent", "unreadable_images", "empty_device_cache",
]

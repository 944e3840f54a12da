"""Wiring: datasets, protocols, presets and the `transagent` click CLI over `extract/` and `distill/`."""

"""Stage 1: run each teacher agent once and write its rows into a cache (`cache_schema`).

Layers, lowest first; a module imports only from the layers below its own (tests/test_layering.py checks it):

    hub, student        where weights come from and what the hub resolved them to; the student's grid
    loading             strict loading against a key allowance, seeded tiny models
    convert             published checkpoints -> transformers directories
    families, weights   cache rows from a loaded agent; downloading and converting published checkpoints
    agents              the registry: one module per agent, its spec and loader
    preflight, runner   loading each agent before a run; the run itself
"""

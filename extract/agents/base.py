"""What an agent is: a registry entry saying how to load it and what it emits.

Each module in `extract/agents/` (one per agent) defines `SPEC = AgentSpec(...)`. The runtime object returned by
`SPEC.load(request)` follows the protocol of its family (`extract.families.<family>`), so the runner never
branches on agent names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from cache_schema.student import StudentGrid
from extract.hub import Source
from extract.loading import KeyAllowance

FAMILIES = ("vision", "language", "t2i", "i2t")


@dataclass
class LoadRequest:
    """Everything `AgentSpec.load` may use. `tiny=True` builds the tiny random config locally (no network)."""

    tiny: bool
    student: StudentGrid
    device: str = "cpu"
    dtype: str = "float32"             # compute dtype for the agent ("float16" on GPU for large agents)
    source: Source | None = None       # overrides SPEC.source (e.g. a local path given on the command line)
    options: dict[str, Any] = field(default_factory=dict)  # agent-specific (e.g. descriptions file for gpt3)
    seed: int = 0                      # seeds tiny random weights


@dataclass(frozen=True)
class AgentSpec:
    name: str
    family: str                        # one of FAMILIES
    source: Source
    preprocessing: dict                # every input detail that changes numbers; hashed into the fingerprint
    emits: tuple[str, ...]             # array names written to the cache
    load: Callable[[LoadRequest], Any] # -> runtime object following the family protocol
    tiny_config: dict = field(default_factory=dict)
    description: str = ""
    depth: int | None = None           # vision agents: blocks of the real model (caches record the loaded depth)
    allowance: KeyAllowance = KeyAllowance()   # keys the real checkpoint may lack or carry beyond the model's
    manual_weights: str = ""           # why the weights need a manual step; without --agent-path it is skipped

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"agent {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")

    def fingerprint_fields(self, tiny: bool) -> dict:
        """The agent part of a cache fingerprint (plain JSON data)."""
        return {
            "name": self.name,
            "family": self.family,
            "source": "tiny-random" if tiny else self.source.describe(),
            "preprocessing": self.preprocessing,
            "tiny_config": self.tiny_config if tiny else None,
        }

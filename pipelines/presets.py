"""Model zoos. `paper` = the models of the paper; `tiny` = random tiny models built locally (offline, CPU).

A preset names the student and, per agent, whether the agent's tiny config or its real source is used. The
agents themselves are registry entries in `extract.agents`; this file only says which flavour to build.
"""
from pathlib import Path

from cache_schema.student import StudentGrid
from distill.config import StudentConfig

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


_PAPER = StudentConfig()   # stage 2's default student is the paper's
PRESETS = {
    "paper": StudentGrid(_PAPER.model, _PAPER.pretrained, image_size=224, patch_size=16, width=768, layers=12),
    "tiny": StudentGrid("TransAgent-Tiny-CLIP", None, image_size=32, patch_size=8, width=64, layers=3),
}


def student_spec(preset: str) -> StudentGrid:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None


def student_blocks(model: str) -> int:
    """The vision blocks of an open_clip architecture: a preset's student's are known without loading open_clip."""
    for spec in PRESETS.values():
        if spec.model == model:
            return spec.layers
    import open_clip

    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(f"student.model {model!r} is not an open_clip architecture (open_clip.list_models())")
    return config["vision_cfg"]["layers"]


def register_model_configs() -> None:
    """Make the tiny open_clip config known to open_clip (idempotent)."""
    import open_clip

    if "TransAgent-Tiny-CLIP" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


# The paper's agents, in a fixed order (gate inputs are concatenated in this order). Stage 2 resolves `--agents all`
# from this list so that it never imports `extract`; a test keeps it equal to the extract registry.
AGENTS = ("dino", "mae", "sam", "vitdet", "gpt3", "vicuna", "bert", "sd", "pixart", "blip2", "shikra")


def resolve_agents(names: str | None, known=AGENTS) -> list[str]:
    """'all' | 'none' | 'a,b' -> agent names in registry order; unknown names are an error listing the known."""
    if names in (None, "all"):
        return list(known)
    if names == "none":
        return []
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if not chosen:  # "" must not silently mean all 11
        raise ValueError(f"--agents {names!r} names no agent; write 'all', 'none' or a comma-separated list of: "
                         f"{', '.join(known)}")
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"unknown agent(s) {', '.join(unknown)}; known agents: {', '.join(known)}")
    return [name for name in known if name in chosen]

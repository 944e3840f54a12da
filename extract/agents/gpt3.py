"""GPT-3 class descriptions (API-only, so read from a CuPL/ProText-style JSON file: by default the official ProText
file that `transagent datasets prepare` fetches), encoded by the frozen student CLIP text encoder: per class,
normalise(mean of the descriptions' features) -> [C, 512] for ViT-B/16."""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.language import ClipTextEncoder, check_options, read_descriptions
from extract.hub import Source

OPTIONS = ("descriptions",)


class Gpt3Runtime:
    def __init__(self, encoder: ClipTextEncoder):
        self.encoder = encoder
        self.dim = encoder.dim
        self.source = {"source": SPEC.source.describe()}

    def descriptions(self, classnames: list[str], ctx) -> dict[str, list[str]]:
        check_options(ctx, OPTIONS, "gpt3")
        return read_descriptions(ctx.options.get("descriptions"), classnames)

    def class_features(self, classnames: list[str], ctx):
        return self.encoder.class_features(self.descriptions(classnames, ctx), classnames)


def load(request: LoadRequest) -> Gpt3Runtime:
    return Gpt3Runtime(ClipTextEncoder(request.student, request.device))


SPEC = AgentSpec(
    name="gpt3",
    family="language",
    source=Source(note="descriptions JSON {classname: [description, ...]}: the official ProText file "
                       "(template_protext/<Dataset>_prompts.json) that `datasets prepare` fetches to "
                       "<dataset>/descriptions/gpt3.json, or --descriptions gpt3=FILE"),
    preprocessing={
        "space": "student",  # class features in the student's text space: stage 2 uses them for L_LAC
        "text": "every description of the class (keys matched case-insensitively, '_' = ' ')",
        "encoder": "frozen student CLIP text encoder (open_clip, fp32, 77-token context)",
        "pooling": "mean of un-normalised description features, then L2-normalised",
    },
    emits=("class_features",),
    load=load,
    tiny_config={"encoder": "the tiny student's CLIP text encoder"},
    description="GPT-3 class descriptions from a file, encoded by the student's CLIP text encoder",
)

"""Stage 2's settings: one frozen tree holding every setting of the method and its default, once.

The command line, the YAML files and a run directory's name are derived from these classes (`pipelines.config`);
the trainer reads them as they are (`distill.trainer.RunConfig` adds the run's data). A field's metadata says
how it is shown: `help`, `choices`, `flag` (its command-line spelling; fields sharing a flag are set together),
`min` (the smallest allowed number) and `short` (its name in a run directory's readable part). No torch here:
`transagent --help` reads these classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROUTERS = ("mlp", "noisy-linear")
MAC_STUDENT_FORMS = ("standardized", "logits")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def setting(default, help_text: str, **metadata):
    """A field with its default and what the command line and the configuration files say about it."""
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a constant warm-up, then a cosine over the epochs (Dassl's schedule, as CoOp and PromptSRC)."""

    lr: float = setting(0.0025, "Base learning rate.", flag="--lr")
    momentum: float = setting(0.9, "SGD momentum.")
    weight_decay: float = setting(5e-4, "SGD weight decay.", short="wd")
    batch_size: int = setting(4, "Training images per step.", flag="--batch-size", min=1, short="bs")
    epochs: int = setting(20, "Training epochs (a protocol's file may set its own: configs/fewshot.yaml).",
                          flag="--epochs", min=0)
    warmup_epochs: int = setting(1, "Epochs at the warm-up learning rate before the cosine.", min=0, short="warmup")
    warmup_lr: float = setting(1e-5, "Learning rate of the warm-up epochs.")


@dataclass(frozen=True)
class PromptConfig:
    """IVLP prompts (`distill.student`): n_ctx tokens per tower, in its first `depth` blocks (0 = no prompts)."""

    n_ctx_vision: int = setting(4, "Vision prompt tokens.", min=0, short="vctx")
    n_ctx_text: int = setting(4, "Text context tokens (as many as ctx_init has, when it is given).", min=0,
                              short="tctx")
    ctx_init: str | None = setting("a photo of a", "Phrase the text context starts from; null = random.")
    depth_vision: int = setting(9, "Vision blocks with prompts (the preset caps it at the student's blocks).",
                                flag="--prompt-depth", min=0, short="vdepth",
                                flag_help="Blocks with prompts, both towers (cross and dg: configs/cross.yaml; the "
                                          "preset caps it at the student's blocks).")
    depth_text: int = setting(9, "Text blocks with prompts (the preset caps it at the student's blocks).",
                              flag="--prompt-depth", min=0, short="tdepth")
    template: str = setting("a photo of a {}.", "Class prompt template: one {} for the class name.")


@dataclass(frozen=True)
class GateConfig:
    """The Mixture-of-Agents gates (`distill.gates`)."""

    router: str = setting("mlp", "Gate type; noisy-linear reproduces the official router.", flag="--router",
                          choices=ROUTERS)
    hidden: int = setting(256, "Hidden width of the mlp gates.", min=1, short="gate_hidden")


@dataclass(frozen=True)
class LossWeights:
    """The weight of each agent term (a term whose weight is 0 is not computed) and how L_LAC / L_MAC are formed."""

    vac: float = setting(1.0, "Weight of L_VAC (vision).", flag="--lambda-vac", short="lvac")
    lac: float = setting(25.0, "Weight of L_LAC (language).", flag="--lambda-lac", short="llac")
    rel: float = setting(1.0, "Weight of L_REL (bert relations).", flag="--lambda-rel", short="lrel")
    mac: float = setting(1.0, "Weight of L_MAC (multi-modal).", flag="--lambda-mac", short="lmac")
    temperature: float = setting(1.0, "L_MAC temperature T.", flag="--temperature")
    renormalize_language: bool = setting(True, "L_LAC against the re-normalised fused target (false: the "
                                               "official code's un-normalised one).", short="renorm")
    mac_student: str = setting("standardized", "L_MAC's student scores: the class logits standardised per image "
                               "like the agents' scores, or the raw logits (the earlier form).",
                               flag="--mac-student", choices=MAC_STUDENT_FORMS)


@dataclass(frozen=True)
class StudentConfig:
    """The frozen CLIP the prompts are learned for, as open_clip names it."""

    model: str = setting("ViT-B-16", "open_clip architecture.", short="student")
    pretrained: str | None = setting("openai", "open_clip pretrained tag or checkpoint path; null = random "
                                     "weights (seeded).")


@dataclass(frozen=True)
class DistillConfig:
    """Everything stage 2 varies: optimiser, prompts, gates, loss, student and the compute precision."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    student: StudentConfig = field(default_factory=StudentConfig)
    precision: str = setting("auto", "auto = bf16 autocast on a GPU, fp32 on the CPU.", flag="--precision",
                             choices=PRECISIONS)

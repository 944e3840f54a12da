"""Language agents (GPT-3, Vicuna, BERT): one feature vector per class name.

GPT-3 and Vicuna contribute class descriptions (from a file or generated), encoded by the frozen student CLIP text
encoder so they live in the student's text space: per class, the mean of the un-normalised description features,
then L2-normalised (reference §3.2). BERT encodes the dataset template per class in its own space; stage 2 only
uses its class-similarity matrix.

A language runtime exposes `dim`, `class_features(classnames, ctx) -> float32 [C, dim]` (unit rows) and
`descriptions(classnames, ctx) -> {classname: [text, ...]} | None` (stored as descriptions.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.fingerprint import sha256_file
from extract.loading import seeded

DESCRIPTIONS_FILE = "descriptions.json"


# ---- family protocol -------------------------------------------------------------------------------------------

def rows(ctx) -> list[tuple[str, int]]:
    if len(set(ctx.classnames)) != len(ctx.classnames):
        raise ValueError(f"class names repeat: {ctx.classnames}")
    return [(classname, 0) for classname in ctx.classnames]


def arrays(runtime, ctx) -> dict[str, ArraySpec]:
    return {"class_features": ArraySpec((runtime.dim,), "float32")}


def compute(runtime, rows, ctx) -> dict[str, np.ndarray]:
    features = runtime.class_features([classname for classname, _ in rows], ctx)
    return {"class_features": np.asarray(features, dtype=np.float32)}


def fingerprint_fields(ctx) -> dict:
    """Class names, template, the student text encoder, and the agent options (a descriptions file by its sha256)."""
    options = {key: value for key, value in ctx.options.items() if key != "descriptions"}
    if "descriptions" in ctx.options:
        options["descriptions_sha256"] = file_sha256(Path(ctx.options["descriptions"]))
    return {
        "classnames": list(ctx.classnames),
        "template": ctx.template,
        "student": {"model": ctx.student.model, "pretrained": ctx.student.pretrained},
        "options": options,
    }


def extra_files(runtime, ctx) -> dict[str, bytes]:
    descriptions = runtime.descriptions(list(ctx.classnames), ctx)
    if descriptions is None:
        return {}
    return {DESCRIPTIONS_FILE: (json.dumps(descriptions, indent=1, ensure_ascii=False) + "\n").encode()}


# ---- descriptions ----------------------------------------------------------------------------------------------

def description_key(name: str) -> str:
    """How the official code matches class names to description keys: lower case, '_' -> ' '."""
    return name.lower().replace("_", " ")


def read_descriptions(path, classnames: list[str]) -> dict[str, list[str]]:
    """A CuPL/ProText-style JSON file {classname: [description, ...]} -> the descriptions of `classnames`."""
    if path is None:
        raise ValueError("this agent needs a descriptions JSON file {classname: [description, ...]} (e.g. the "
                         "ProText/CuPL GPT-3 descriptions): `transagent datasets prepare` fetches the official "
                         "ones to <dataset>/descriptions/<agent>.json, or pass --descriptions AGENT=FILE")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"descriptions file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{classname: [description, ...]}}, got {type(data).__name__}")
    by_key: dict[str, list[str]] = {}
    for name, texts in data.items():
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{path}: {name!r} must map to a non-empty list of non-empty strings")
        key = description_key(name)
        if key in by_key:
            raise ValueError(f"{path}: two entries match the class key {key!r}")
        by_key[key] = texts
    missing = [name for name in classnames if description_key(name) not in by_key]
    if missing:
        raise ValueError(f"{path}: no descriptions for {len(missing)} of {len(classnames)} classes: "
                         f"{', '.join(map(repr, missing))} (keys match case-insensitively, '_' = ' ')")
    return {name: list(by_key[description_key(name)]) for name in classnames}


def check_options(ctx, allowed: tuple[str, ...], agent: str) -> None:
    unknown = sorted(set(ctx.options) - set(allowed))
    if unknown:
        raise ValueError(f"agent {agent!r}: unknown option(s) {unknown}; allowed: {list(allowed) or 'none'}")


def file_sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"descriptions file not found: {path}")
    return sha256_file(path)


# ---- shared encoders and tokenizers ----------------------------------------------------------------------------

class ClipTextEncoder:
    """The frozen student CLIP text encoder (open_clip), fp32 as in the official code.

    A student without pretrained weights is built (on the CPU) from seed 0, as stage 2 builds it with
    torch.manual_seed(0), so both stages hold the same random tower; the caller's RNG state is left untouched."""

    def __init__(self, student, device: str = "cpu", chunk: int = 256):
        import open_clip

        # open_clip only warns when a tag was trained with QuickGELU (OpenAI weights) but the config says GELU;
        # follow the tag, exactly as the stage-2 student does, or the two text towers differ.
        tag = (open_clip.get_pretrained_cfg(student.model, student.pretrained) or {}) if student.pretrained else {}
        try:
            with seeded(0):
                model = open_clip.create_model(student.model, pretrained=student.pretrained,
                                               force_quick_gelu=bool(tag.get("quick_gelu", False)))
        except (OSError, RuntimeError) as error:
            raise RuntimeError(f"cannot build the student CLIP {student.model!r} (pretrained={student.pretrained!r}) "
                               f"for the text encoder: {error}\nOffline routes: a local checkpoint path as the "
                               f"student's pretrained, or HF_HUB_OFFLINE=1 with the weights in the Hugging Face "
                               f"cache.") from error
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(student.model)
        self.device, self.chunk = device, chunk
        self.dim = int(self.encode([""]).shape[1])

    def encode(self, texts: list[str]):
        """Un-normalised text features [N, dim] (float32, CPU)."""
        import torch

        features = []
        with torch.no_grad():
            for start in range(0, len(texts), self.chunk):
                tokens = self.tokenizer(texts[start:start + self.chunk]).to(self.device)
                features.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(features)

    def class_features(self, descriptions: dict[str, list[str]], classnames: list[str]) -> np.ndarray:
        """normalise(mean_j encode(description_j)) per class -> [C, dim]."""
        import torch
        import torch.nn.functional as F

        means = torch.stack([self.encode(descriptions[name]).mean(dim=0) for name in classnames])
        return F.normalize(means, dim=-1).numpy()


def tiny_tokenizer(template: str, **special_tokens):
    """A character-level tokenizer built in code (printable ASCII + newline, no merges): nothing is downloaded and
    whatever a tiny random LLM generates decodes to readable text. `template` is the post-processing template,
    e.g. "[CLS] $A [SEP]" or "<s> $A"; `special_tokens` are PreTrainedTokenizerFast arguments (unk_token=...)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    special = list(dict.fromkeys(special_tokens.values()))
    characters = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(special + characters)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=special_tokens["unk_token"]))
    tokenizer.decoder = decoders.Fuse()
    used = [token for token in special if token in template.split()]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in used])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)

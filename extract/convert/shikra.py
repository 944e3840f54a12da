"""Shikra-7B in transformers form: apply the published delta to LLaMA-7B, write a directory the `shikra` agent loads.

The delta (e.g. shikras/shikra-7b-delta-v1) holds, for every key of the LLaMA-7B checkpoint, the weights to ADD to
the base. `model.embed_tokens.weight` and `lm_head.weight` may have extra rows for Shikra's added tokens: the base
is added into their leading rows (as Shikra's `apply_delta.py` does). `model.mm_projector.weight/bias` (one Linear,
1024 -> 4096) exist only in the delta and are taken as they are. The vision tower is CLIP ViT-L/14
(openai/clip-vit-large-patch14), copied in unchanged.

Output directory:
    shikra.json                  what was converted (names only, no absolute paths)
    language_model/              LLaMA as LlamaForCausalLM safetensors (+ config) and the delta's tokenizer
    vision_tower/                CLIPVisionModel
    mm_projector.safetensors     weight [d_llm, d_vision], bias [d_llm]

Heavy imports stay inside functions: the agent registry imports this module (the `shikra` agent loads what it
writes, with the key allowance defined here).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from extract.hub import Source
from extract.loading import KeyAllowance, load_model, torch_dtype

FORMAT = "transagent-shikra"
VERSION = 1
MANIFEST = "shikra.json"
LANGUAGE_DIR = "language_model"
VISION_DIR = "vision_tower"
PROJECTOR_FILE = "mm_projector.safetensors"
CLIP_L14 = "openai/clip-vit-large-patch14"

PROJECTOR_KEYS = {"model.mm_projector.weight": "weight", "model.mm_projector.bias": "bias"}
GROWN_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # may carry extra rows for added tokens
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
SHARD_BYTES = 5 * 2**30
CLIP_TOWER_ALLOWANCE = KeyAllowance(
    unexpected=("text_model.*", "text_projection.*", "visual_projection.*", "logit_scale"),
    reason="openai/clip-vit-large-patch14 is a full CLIPModel: its text tower and projections are not the vision tower")
LANGUAGE_ALLOWANCE = KeyAllowance(unexpected=("lm_head.weight",),
                                  reason="the converted LLaMA keeps its LM head, which is not run: class features "
                                         "are hidden states")


def convert(source: Path, output: Path, *, base: Path, vision_tower: str = CLIP_L14, dtype: str = "float16",
            shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the converted Shikra directory at `output` (atomically: built beside it, renamed when complete).

    source: the Shikra delta directory (e.g. shikras/shikra-7b-delta-v1); base: LLaMA-7B in Hugging Face format;
    vision_tower: a CLIP ViT-L/14 hub id or local directory. Returns `output`.
    """
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaConfig

    base, delta, out = Path(base), Path(source), Path(output)
    for name, path in (("base", base), ("delta", delta)):
        if not path.is_dir():
            raise FileNotFoundError(f"shikra conversion: {name} directory {path} does not exist")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"shikra conversion: {out} exists and is not empty; choose another output directory")
    target_dtype = torch_dtype(dtype)
    # The vision tower first: a missing download fails before minutes of merging.
    tower = Source(local_path=vision_tower) if Path(vision_tower).is_dir() else Source(hub_id=vision_tower)
    vision_model = load_model(CLIPVisionModel, tower, "shikra", CLIP_TOWER_ALLOWANCE, dtype=target_dtype)
    config = LlamaConfig.from_pretrained(base)
    language, projector = apply_delta(read_state_dict(base), read_state_dict(delta), target_dtype)
    config.vocab_size = language["model.embed_tokens.weight"].shape[0]
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype

    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    try:
        (work / LANGUAGE_DIR).mkdir(parents=True)
        config.save_pretrained(work / LANGUAGE_DIR)
        write_safetensors(language, work / LANGUAGE_DIR, shard_bytes)
        copy_tokenizer(delta if any((delta / f).exists() for f in TOKENIZER_FILES) else base, work / LANGUAGE_DIR)
        save_file({key: tensor.contiguous() for key, tensor in projector.items()}, work / PROJECTOR_FILE)
        vision_model.save_pretrained(work / VISION_DIR)
        manifest = {
            "format": FORMAT, "version": VERSION, "base": base.name, "delta": delta.name,
            "vision_tower": Path(vision_tower).name if tower.local_path else vision_tower, "dtype": dtype,
            "projector": list(projector["weight"].shape), "vocab_size": config.vocab_size,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    work.rename(out)
    return out


def apply_delta(base: dict, delta: dict, dtype) -> tuple[dict, dict]:
    """(LLaMA state dict = base + delta, projector {weight, bias}). Sums run in float32, results in `dtype`."""
    language, projector = {}, {}
    for name, change in delta.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer the model recomputes; adding it would double it
            continue
        if name in PROJECTOR_KEYS:
            projector[PROJECTOR_KEYS[name]] = change.to(dtype)
            continue
        if name not in base:
            raise KeyError(f"delta key {name!r} is not in the base checkpoint; only {sorted(PROJECTOR_KEYS)} may be "
                           "new (is the base LLaMA-7B in Hugging Face format?)")
        original = base[name]
        merged = change.float().clone()
        if merged.shape == original.shape:
            merged += original.float()
        elif name in GROWN_KEYS and merged.shape[0] > original.shape[0] and merged.shape[1:] == original.shape[1:]:
            merged[: original.shape[0]] += original.float()
        else:
            raise ValueError(f"{name}: delta shape {tuple(merged.shape)} does not fit base {tuple(original.shape)}")
        language[name] = merged.to(dtype)
    missing = sorted(k for k in base if k not in delta and not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise ValueError(f"the delta lacks {len(missing)} base keys, e.g. {missing[:3]}: is it the Shikra delta?")
    if set(projector) != {"weight", "bias"}:
        raise ValueError(f"the delta has no complete projector {sorted(PROJECTOR_KEYS)}: is it the Shikra delta?")
    return language, projector


def read_state_dict(directory: Path) -> dict:
    """All tensors of a Hugging Face checkpoint directory (*.safetensors, else pytorch_model*.bin; sharded or not)."""
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    loader = load_file
    if not files:
        files = sorted(directory.glob("pytorch_model*.bin"))
        loader = lambda path: torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # noqa: E731
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    state = {}
    for path in files:
        part = loader(path)
        overlap = state.keys() & part.keys()
        if overlap:
            raise ValueError(f"{path.name} repeats keys of another shard, e.g. {sorted(overlap)[:2]}")
        state.update(part)
    return state


def write_safetensors(state: dict, directory: Path, shard_bytes: int) -> None:
    """Save as model.safetensors, or as model-0000i-of-0000n.safetensors + index when larger than one shard."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: state[k].contiguous() for k in shards[0]}, directory / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in names}, directory / filename, metadata=metadata)
        weight_map.update({k: filename for k in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(source: Path, target: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (source / name).exists()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source}")
    for name in copied:
        shutil.copy2(source / name, target / name)


def load_converted(directory: Path, dtype):
    """(vision tower, projector, LLaMA model, tokenizer) from a directory written by `convert`. Every part loads
    strictly: only the LM head (unused: class features are hidden states) may be left out of the LLaMA model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaModel

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} is not a converted Shikra directory (no {MANIFEST}); write one with "
                                "`transagent agents convert shikra`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')} v{manifest.get('version')}, "
                         f"expected {FORMAT} v{VERSION}; convert again")
    vision_tower = load_model(CLIPVisionModel, Source(local_path=str(directory)), "shikra", subfolder=VISION_DIR,
                              dtype=dtype)
    language_model = load_model(LlamaModel, Source(local_path=str(directory)), "shikra", LANGUAGE_ALLOWANCE,
                                subfolder=LANGUAGE_DIR, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory / LANGUAGE_DIR)
    weights = load_file(directory / PROJECTOR_FILE)
    projector = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0], dtype=dtype)
    projector.load_state_dict(weights, strict=True)
    return vision_tower, projector, language_model, tokenizer

"""FAIR MAE pre-training checkpoint -> transformers ViTMAEModel directory (config.json + model.safetensors).

Reads the paper's `mae_pretrain_vit_base.pth` (`{"model": state_dict}`, timm ViT names, encoder only) with
`torch.load(weights_only=True)`, which builds tensors and plain containers and never runs pickled code. Names:

    cls_token, pos_embed              -> embeddings.cls_token, embeddings.position_embeddings
    patch_embed.proj.{weight,bias}    -> embeddings.patch_embeddings.projection.{weight,bias}
    blocks.{i}.norm1 / norm2          -> encoder.layer.{i}.layernorm_before / layernorm_after
    blocks.{i}.attn.qkv [3D, D]       -> encoder.layer.{i}.attention.attention.{query,key,value} (rows q | k | v)
    blocks.{i}.attn.proj              -> encoder.layer.{i}.attention.output.dense
    blocks.{i}.mlp.fc1 / fc2          -> encoder.layer.{i}.intermediate.dense / output.dense
    norm                              -> layernorm

Decoder tensors (`mask_token`, `decoder_*`, present in full training checkpoints) are skipped and counted; any other
key, or a missing one, refuses the conversion. The architecture is read off the shapes; the head count (not in
any shape) follows the MAE models: 12 for width 768, 16 for 1024 and 1280, else width / 64. The written directory
is loaded back strictly before the conversion counts as done.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import ViTMAEConfig, ViTMAEModel

from cache_schema.fingerprint import sha256_file
from extract.hub import Source
from extract.loading import load_model

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
HEAD_WIDTH = 64
DECODER = re.compile(r"^(mask_token$|decoder_)")
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
BLOCK_NAMES = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.output.dense.weight", "attn.proj.bias": "attention.output.dense.bias",
    "mlp.fc1.weight": "intermediate.dense.weight", "mlp.fc1.bias": "intermediate.dense.bias",
    "mlp.fc2.weight": "output.dense.weight", "mlp.fc2.bias": "output.dense.bias",
}
FIXED_NAMES = {
    "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
}


def convert(source, output) -> Path:
    """Convert `source` (the official .pth) into the transformers directory `output`; returns `output`."""
    source, output = Path(source), Path(output)
    weights = read_checkpoint(source)
    encoder = {key: value for key, value in weights.items() if not DECODER.match(key)}
    skipped = len(weights) - len(encoder)
    config = ViTMAEConfig(**infer_config(encoder), mask_ratio=0.0)
    state = renamed(encoder)
    config.architectures = ["ViTMAEModel"]
    output.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output)
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, output / "model.safetensors",
              metadata={"format": "pt"})
    load_model(ViTMAEModel, Source(local_path=str(output)), "mae")  # no key may be missing or left over
    record = {"converter": "extract.convert.mae", "source_file": source.name, "source_sha256": sha256_file(source),
              "encoder_tensors": len(encoder), "decoder_tensors_skipped": skipped}
    (output / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return output


def read_checkpoint(path: Path) -> dict:
    """The `model` tensors of an MAE checkpoint, unpickled with weights_only=True (tensors and containers only)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    weights = data.get("model", data)
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise ValueError(f"{path}: the 'model' entry is not a state dict of tensors")
    return dict(weights)


def renamed(encoder: dict) -> dict:
    """timm/MAE encoder names -> the hub's ViTMAEModel names, the fused qkv split into query, key and value."""
    state, unknown = {}, []
    for key, tensor in encoder.items():
        if key in FIXED_NAMES:
            state[FIXED_NAMES[key]] = tensor
            continue
        match = BLOCK.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, rest = match.groups()
        prefix = f"encoder.layer.{index}."
        if rest in BLOCK_NAMES:
            state[prefix + BLOCK_NAMES[rest]] = tensor
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            if tensor.shape[0] % 3:
                raise ValueError(f"{key}: {tuple(tensor.shape)} does not split into query, key and value")
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), tensor.chunk(3, dim=0), strict=True):
                state[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not MAE encoder weights, e.g. {sorted(unknown)[:3]} (a "
                         f"fine-tuned checkpoint has head/fc_norm; the paper used mae_pretrain_vit_base.pth)")
    return state


def infer_config(encoder: dict) -> dict:
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in required if key not in encoder]
    if missing:
        raise ValueError(f"not an MAE ViT checkpoint: no {', '.join(missing)}")
    hidden = int(encoder["cls_token"].shape[-1])
    patch = int(encoder["patch_embed.proj.weight"].shape[-1])
    positions = int(encoder["pos_embed"].shape[1]) - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise ValueError(f"pos_embed has {positions + 1} rows: expected a CLS slot + a square grid")
    heads = HEADS_BY_WIDTH.get(hidden, hidden // HEAD_WIDTH)
    if heads < 1 or hidden % heads:
        raise ValueError(f"cannot tell the attention heads of width {hidden}")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": 1 + max(int(BLOCK.match(key).group(1)) for key in encoder if BLOCK.match(key)),
        "num_attention_heads": heads,
        "intermediate_size": int(encoder["blocks.0.mlp.fc1.weight"].shape[0]),
        "image_size": grid * patch,
        "patch_size": patch,
        "num_channels": int(encoder["patch_embed.proj.weight"].shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in encoder,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }

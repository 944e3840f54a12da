"""detectron2 ViTDet checkpoint -> transformers VitDetModel directory (config.json + model.safetensors).

Reads the model-zoo pickle (`{"model": {name: ndarray}, "__author__": ...}`, e.g. COCO
mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl) or a training `.pth` (`{"model": state_dict, ...}`), keeps
the `backbone.net.*` weights (the plain ViT; the feature pyramid and heads are not needed) and renames them:

    pos_embed                         -> embeddings.position_embeddings
    patch_embed.proj.{weight,bias}    -> embeddings.projection.{weight,bias}
    blocks.{i}.attn.*                 -> encoder.layer.{i}.attention.*   (qkv, proj, rel_pos_h, rel_pos_w)
    blocks.{i}.{norm1,norm2,mlp,residual}.* -> encoder.layer.{i}.{same}.*

Relative-position tables are kept (the official TransAgent loader dropped them). The architecture is read off the
weight shapes: the relative-position tables give the head width, the window size, the windowed blocks (shorter
tables) and the training image size (the global blocks' tables).
"""
from __future__ import annotations

import codecs
import collections
import json
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from transformers import VitDetConfig, VitDetModel

from cache_schema.fingerprint import sha256_file

PREFIX = "backbone.net."


def convert(source, output) -> Path:
    """Convert `source` (.pkl or .pth) into the transformers directory `output`; returns `output`."""
    source, output = Path(source), Path(output)
    backbone = backbone_weights(read_checkpoint(source))
    config = VitDetConfig(**infer_config(backbone))
    state = {rename(key): torch.from_numpy(np.ascontiguousarray(value)) for key, value in backbone.items()}
    model = VitDetModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: the converted weights do not fit VitDetModel; missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    record = {"converter": "extract.convert.vitdet", "source_file": source.name, "source_sha256": sha256_file(source),
              "backbone_tensors": len(backbone)}
    (output / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return output


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The `model` weights of a detectron2 checkpoint as numpy arrays. Pickles are read with an unpickler that
    builds numpy arrays and plain containers only, never arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".pkl":
        with open(path, "rb") as file:
            data = _ArrayUnpickler(file, encoding="latin1").load()
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    weights = data.get("model", data)
    return {key: value.numpy() if hasattr(value, "numpy") else np.asarray(value) for key, value in weights.items()}


def backbone_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    backbone = {key[len(PREFIX):]: value for key, value in weights.items() if key.startswith(PREFIX)}
    if not backbone:
        raise ValueError(f"no '{PREFIX}*' weights: not a detectron2 ViTDet checkpoint")
    return backbone


def rename(key: str) -> str:
    """detectron2 ViT name (without `backbone.net.`) -> transformers VitDetModel name."""
    if key == "pos_embed":
        return "embeddings.position_embeddings"
    if key.startswith("patch_embed.proj."):
        return "embeddings.projection." + key[len("patch_embed.proj."):]
    match = re.fullmatch(r"blocks\.(\d+)\.(attn\.|norm1\.|norm2\.|mlp\.|residual\.)(.+)", key)
    if match is None:
        raise ValueError(f"unexpected ViTDet backbone weight {PREFIX}{key}")
    index, part, rest = match.groups()
    return f"encoder.layer.{index}.{'attention.' if part == 'attn.' else part}{rest}"


def infer_config(backbone: dict[str, np.ndarray]) -> dict:
    """VitDetConfig arguments from the weight shapes."""
    hidden, _, patch, _ = backbone["patch_embed.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in backbone if key.startswith("blocks."))
    positions = backbone["pos_embed"].shape[1] - 1  # detectron2 ViTDet keeps the pre-training CLS slot
    pretrain_grid = int(round(positions ** 0.5))
    if pretrain_grid * pretrain_grid != positions:
        raise ValueError(f"pos_embed has {positions + 1} rows: expected a CLS slot + a square grid")
    tables = {index: backbone.get(f"blocks.{index}.attn.rel_pos_h") for index in range(depth)}
    if any(table is None for table in tables.values()):
        raise ValueError("every block needs its relative-position tables (attn.rel_pos_h/w); they fix the heads, "
                         "the windows and the training resolution")
    lengths = {index: table.shape[0] for index, table in tables.items()}
    global_length = max(lengths.values())
    windowed = sorted(index for index, length in lengths.items() if length < global_length)
    window_length = min(lengths.values())
    return {
        "hidden_size": int(hidden),
        "num_hidden_layers": depth,
        "num_attention_heads": int(hidden) // int(tables[0].shape[1]),
        "mlp_ratio": int(backbone["blocks.0.mlp.fc1.weight"].shape[0]) // int(hidden),
        "patch_size": int(patch),
        "image_size": (global_length + 1) // 2 * int(patch),
        "pretrain_image_size": pretrain_grid * int(patch),
        "qkv_bias": "blocks.0.attn.qkv.bias" in backbone,
        "use_absolute_position_embeddings": True,
        "use_relative_position_embeddings": True,
        "window_size": (window_length + 1) // 2 if windowed else 0,
        "window_block_indices": windowed,
        "residual_block_indices": sorted({int(key.split(".")[1]) for key in backbone if ".residual." in key}),
        "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0,
    }


def _multiarray():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray


_SAFE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray()._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray()._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray().scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray().scalar,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a weight pickle should hold numpy arrays only")

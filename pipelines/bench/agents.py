"""The agents at real size with random weights (no checkpoint to download), or the registry's tiny ones."""
from __future__ import annotations

import dataclasses

from extract.agents import dino, get_agent, mae, sam, vitdet
from extract.loading import seeded
from extract.agents.base import LoadRequest, Source
from extract.families.vision import IMAGENET_MEAN, IMAGENET_STD
from pipelines.bench.fixtures import student_info
from pipelines.bench.plans import VISION_AGENTS, Shapes
from pipelines.presets import register_model_configs

# Real-size configurations (the published models' shapes); weights are random, built locally, seeded.
VIT_B16_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                  "image_size": 224, "patch_size": 16, "qkv_bias": True, "layer_norm_eps": 1e-6}
SAM_VIT_B_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_dim": 3072,
                    "image_size": 1024, "patch_size": 16, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11],
                    "output_channels": 256}
VITDET_B_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                   "image_size": 1024, "pretrain_image_size": 224, "patch_size": 16, "window_size": 14,
                   "window_block_indices": [0, 1, 3, 4, 6, 7, 9, 10], "use_relative_position_embeddings": True,
                   "use_absolute_position_embeddings": True, "qkv_bias": True, "layer_norm_eps": 1e-6}


def real_size_load(name: str):
    """A loader for agent `name` that builds the real-size model with random weights, the way the agent module
    builds its tiny model (same runtime class, same resizing at load), so no checkpoint is needed."""
    def load(request):
        # transformers is imported by the variants that run agents only: the others' peak memory leaves it out
        from transformers import (
            SamVisionConfig,
            ViTConfig,
            VitDetConfig,
            VitDetModel,
            ViTMAEConfig,
            ViTMAEModel,
            ViTModel,
        )
        from transformers.models.sam.modeling_sam import SamVisionEncoder

        source = {"source": "bench: random weights at real size", "seed": request.seed}
        common = dict(device=request.device, dtype=request.dtype, source=source)
        with seeded(request.seed):
            if name == "dino":
                model = ViTModel(ViTConfig(**VIT_B16_CONFIG), add_pooling_layer=False)
                return dino.DinoRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
            if name == "mae":
                model = ViTMAEModel(ViTMAEConfig(**VIT_B16_CONFIG, mask_ratio=0.0))
                return mae.MaeRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
            if name == "sam":
                native = SamVisionEncoder(SamVisionConfig(**SAM_VIT_B_CONFIG))
                return sam.SamRuntime(sam.at_image_size(native, request.student.image_size), request.student,
                                      mean=sam.SAM_PIXEL_MEAN, std=sam.SAM_PIXEL_STD, pixel_scale=255.0, **common)
            if name == "vitdet":
                model = VitDetModel(VitDetConfig(**VITDET_B_CONFIG))
                return vitdet.VitDetRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
        raise ValueError(f"no real-size configuration for agent {name!r}")

    return load


def agent_spec(name: str, shapes: Shapes):
    """The registry's AgentSpec; at real shapes its loader builds random real-size weights instead of downloading."""
    spec = get_agent(name)
    if not shapes.real:
        return spec
    return dataclasses.replace(spec, load=real_size_load(name), source=Source(note="bench: random real-size weights"))


def agent_dtype(device: str) -> str:
    return "float16" if device.startswith("cuda") else "float32"   # as `transagent extract` chooses


def vision_runtimes(shapes: Shapes, device: str) -> dict:
    request = LoadRequest(tiny=not shapes.real, student=student_info(shapes), device=device,
                          dtype=agent_dtype(device))
    return {name: agent_spec(name, shapes).load(request) for name in VISION_AGENTS}


def register_tiny(shapes: Shapes) -> None:
    if not shapes.real:
        register_model_configs()

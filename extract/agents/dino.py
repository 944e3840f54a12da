"""DINO ViT-B/16 (self-distillation, Caron et al. 2021): every block's patch tokens, CLS dropped, no final norm."""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.vision import GRID_POLICY, IMAGENET_MEAN, IMAGENET_STD, VisionRuntime, vit_token_grids
from extract.hub import Source, resolved_source
from extract.loading import KeyAllowance, load_model, seeded

SOURCE = Source(hub_id="facebook/dino-vitb16")
ALLOWANCE = KeyAllowance(unexpected=("pooler.dense.*",),
                         reason="the pooler is not run (tokens are block outputs); facebook/dino-vitb16 has none, a "
                                "copy saved from ViTModel's default has one")
TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256,
               "image_size": 32, "patch_size": 8, "qkv_bias": True, "layer_norm_eps": 1e-6}


class DinoRuntime(VisionRuntime):
    def block_outputs(self, pixels):
        out = self.model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        return vit_token_grids(out.hidden_states)


def load(request: LoadRequest) -> DinoRuntime:
    from transformers import ViTConfig, ViTModel

    source = request.source or SOURCE
    if request.tiny:
        with seeded(request.seed):
            model = ViTModel(ViTConfig(**TINY_CONFIG), add_pooling_layer=False)
        source_record = {"source": "tiny-random", "seed": request.seed}
    else:
        model = load_model(ViTModel, source, "dino", ALLOWANCE, add_pooling_layer=False)
        source_record = resolved_source(source)
    return DinoRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=request.device,
                       dtype=request.dtype, source=source_record)


SPEC = AgentSpec(
    name="dino",
    family="vision",
    source=SOURCE,
    preprocessing={
        "value_range": [0, 1], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "resolution": "student image size; position embeddings bicubic-interpolated if the grid differs",
        "tokens": "every block output, no final norm, CLS dropped, L2-normalised per token",
        "grid": GRID_POLICY,
    },
    emits=("tokens", "token_mean", "views", "tokens_scale"),
    load=load,
    tiny_config=TINY_CONFIG,
    depth=12,
    description="DINO ViT-B/16 patch tokens of every block (transformers ViTModel)",
    allowance=ALLOWANCE,
)

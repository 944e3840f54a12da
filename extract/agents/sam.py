"""SAM ViT-B image encoder (Kirillov et al. 2023) at the student's resolution; block outputs before the neck.

SAM is trained at 1024 px (64 x 64 grid). As the official code does, the encoder is rebuilt for the student's
image size at load: the absolute position embedding is resized bicubically to the student grid and the
relative-position tables of the global-attention blocks linearly to 2G - 1 (windowed blocks keep theirs: they
attend within a window whatever the image size). Input: SAM's own pixel statistics on a 0-255 image (the official
code applied them to a [0, 1] image, reference §10 row 4)."""
from __future__ import annotations

import copy

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.vision import GRID_POLICY, VisionRuntime
from extract.hub import Source, resolved_source
from extract.loading import load_model, seeded

SOURCE = Source(hub_id="facebook/sam-vit-base")
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# native 64 px (8 x 8 grid) so that loading at the tiny student's 32 px exercises the same resizing as 1024 -> 224
TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "mlp_dim": 256,
               "image_size": 64, "patch_size": 8, "window_size": 4, "global_attn_indexes": [2],
               "output_channels": 32}


class SamRuntime(VisionRuntime):
    def block_outputs(self, pixels):
        import torch

        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return torch.stack(out.hidden_states[1:], dim=1)  # blocks give [B, g, g, D]; the neck is not used


def resize_abs_pos(pos_embed, grid: int):
    """[1, h, w, D] -> [1, grid, grid, D], bicubic."""
    import torch.nn.functional as F

    if pos_embed.shape[1:3] == (grid, grid):
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def resize_rel_pos(table, length: int):
    """[n, head_dim] relative-position table -> [length, head_dim], linear."""
    import torch.nn.functional as F

    if table.shape[0] == length:
        return table
    return F.interpolate(table.T.unsqueeze(0), size=length, mode="linear")[0].T


def at_image_size(encoder, image_size: int):
    """A SamVisionEncoder rebuilt for `image_size`, with its position tables resized."""
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    config = copy.deepcopy(encoder.config)
    config.image_size = image_size
    grid = image_size // config.patch_size
    state = dict(encoder.state_dict())
    if config.use_abs_pos:
        state["pos_embed"] = resize_abs_pos(state["pos_embed"], grid)
    if config.use_rel_pos:
        for index in config.global_attn_indexes:
            for axis in ("h", "w"):
                name = f"layers.{index}.attn.rel_pos_{axis}"
                state[name] = resize_rel_pos(state[name], 2 * grid - 1)
    with seeded(0):  # the initial weights are all overwritten; seeded only so no global RNG draw happens
        resized = SamVisionEncoder(config)
    resized.load_state_dict(state, strict=True)
    return resized


def load(request: LoadRequest) -> SamRuntime:
    from transformers import SamModel, SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    source = request.source or SOURCE
    if request.tiny:
        with seeded(request.seed):
            native = SamVisionEncoder(SamVisionConfig(**TINY_CONFIG))
        source_record = {"source": "tiny-random", "seed": request.seed}
    else:
        full = load_model(SamModel, source, "sam")  # prompt encoder and mask decoder loaded (strictly), unused
        native, source_record = full.vision_encoder, resolved_source(source)
    return SamRuntime(at_image_size(native, request.student.image_size), request.student, mean=SAM_PIXEL_MEAN,
                      std=SAM_PIXEL_STD, pixel_scale=255.0, device=request.device, dtype=request.dtype,
                      source=source_record)


SPEC = AgentSpec(
    name="sam",
    family="vision",
    source=SOURCE,
    preprocessing={
        "value_range": [0, 255], "mean": list(SAM_PIXEL_MEAN), "std": list(SAM_PIXEL_STD),
        "resolution": "student image size; abs pos-embed bicubic-resized and global-attention rel-pos tables "
                      "linearly resized to 2G-1 at load",
        "tokens": "every block output before the neck, L2-normalised per token",
        "grid": GRID_POLICY,
    },
    emits=("tokens", "token_mean", "views", "tokens_scale"),
    load=load,
    tiny_config=TINY_CONFIG,
    depth=12,
    description="SAM ViT-B image-encoder block outputs at the student's resolution (transformers SamVisionEncoder)",
)

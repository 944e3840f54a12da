"""MAE ViT-B/16 (masked autoencoder, He et al. 2022), run unmasked and unshuffled so its output is deterministic.

The weights are the paper's: FAIR's `mae_pretrain_vit_base.pth` (encoder only), downloaded and converted to a
transformers ViTMAE directory at first use (`transagent agents convert mae`). The hub's facebook/vit-mae-base is
most likely the visualisation checkpoint (trained with pixel targets, not normalised ones); it still loads through
`--agent-path mae=DIR`, its decoder left unused.

transformers' ViTMAEModel always shuffles patches by argsort(noise) and keeps (1 - mask_ratio) of them. With
mask_ratio 0 and noise = 0, 1, 2, ... every patch is kept in raster order, whatever the RNG state."""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.vision import GRID_POLICY, IMAGENET_MEAN, IMAGENET_STD, VisionRuntime, vit_token_grids
from extract.hub import Source, resolved_source
from extract.loading import KeyAllowance, load_model, seeded

URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"
SOURCE = Source(url=URL, converter="mae",
                note="FAIR MAE pre-training checkpoint (encoder), downloaded and converted at first use; or "
                     "`transagent agents convert mae <.pth> DIR` and --agent-path mae=DIR")
ALLOWANCE = KeyAllowance(unexpected=("decoder.*",),
                         reason="the pixel decoder of a pre-training checkpoint (e.g. facebook/vit-mae-base, "
                                "ViTMAEForPreTraining) is not run: the encoder's blocks are the agent")
TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256,
               "image_size": 32, "patch_size": 8, "qkv_bias": True, "layer_norm_eps": 1e-6}


class MaeRuntime(VisionRuntime):
    def __init__(self, model, student, **kwargs):
        if model.config.mask_ratio != 0.0:
            raise ValueError(f"MAE must run unmasked (mask_ratio 0), got {model.config.mask_ratio}")
        super().__init__(model, student, **kwargs)

    def block_outputs(self, pixels):
        import torch

        patch = self.model.config.patch_size
        patches = (pixels.shape[2] // patch) * (pixels.shape[3] // patch)
        identity_order = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        out = self.model(pixel_values=pixels, noise=identity_order, output_hidden_states=True,
                         interpolate_pos_encoding=True)
        return vit_token_grids(out.hidden_states)


def load(request: LoadRequest) -> MaeRuntime:
    from transformers import ViTMAEConfig, ViTMAEModel

    source = request.source or SOURCE
    if request.tiny:
        with seeded(request.seed):
            model = ViTMAEModel(ViTMAEConfig(**TINY_CONFIG, mask_ratio=0.0))
        source_record = {"source": "tiny-random", "seed": request.seed}
    else:
        if source.local_path is None and source.hub_id is None:
            raise ValueError(f"agent 'mae' loads a converted directory: `transagent extract` downloads {URL} and "
                             f"converts it; by hand: `transagent agents convert mae <.pth> DIR`, then "
                             f"--agent-path mae=DIR")
        model = load_model(ViTMAEModel, source, "mae", ALLOWANCE, mask_ratio=0.0)
        source_record = resolved_source(source)
    return MaeRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=request.device,
                      dtype=request.dtype, source=source_record)


SPEC = AgentSpec(
    name="mae",
    family="vision",
    source=SOURCE,
    preprocessing={
        "value_range": [0, 1], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "resolution": "student image size; position embeddings bicubic-interpolated if the grid differs",
        "masking": "none: mask_ratio 0, identity noise (every patch, raster order)",
        "tokens": "every block output, no final norm, CLS dropped, L2-normalised per token",
        "grid": GRID_POLICY,
    },
    emits=("tokens", "token_mean", "views", "tokens_scale"),
    load=load,
    tiny_config=TINY_CONFIG,
    depth=12,
    description="MAE ViT-B/16 encoder patch tokens of every block, unmasked (transformers ViTMAEModel)",
    allowance=ALLOWANCE,
)

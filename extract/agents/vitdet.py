"""ViTDet-B backbone (Li et al. 2022, Mask R-CNN on COCO): every block's patch tokens at the student's resolution.

There is no transformers-format ViTDet-B on the hub: convert the detectron2 checkpoint once with
`transagent agents convert vitdet model_final_61ccd1.pkl DIR` and pass `--agent-path vitdet=DIR`.
Unlike the official code, relative-position terms are kept (it dropped every key containing "rel") and the
windowed blocks attend within their windows, as in detectron2; position tables are interpolated to the input
grid the way detectron2 does (absolute: bicubic without the CLS slot; relative: linear)."""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.vision import GRID_POLICY, IMAGENET_MEAN, IMAGENET_STD, VisionRuntime
from extract.hub import Source, resolved_source
from extract.loading import load_model, seeded

URL = ("https://dl.fbaipublicfiles.com/detectron2/ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/"
       "model_final_61ccd1.pkl")
SOURCE = Source(url=URL, converter="vitdet",
                note="detectron2 COCO Mask R-CNN ViTDet-B checkpoint, downloaded and converted at first use; or "
                     "`transagent agents convert vitdet <.pkl/.pth> DIR` and --agent-path vitdet=DIR")
# image_size 64 plays the role of 1024 (global rel-pos tables longer than the student grid needs),
# pretrain_image_size 32 the role of 224, window 4 the role of 14.
TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "mlp_ratio": 4,
               "image_size": 64, "pretrain_image_size": 32, "patch_size": 8, "window_size": 4,
               "window_block_indices": [0, 1], "use_relative_position_embeddings": True, "layer_norm_eps": 1e-6}


class VitDetRuntime(VisionRuntime):
    def block_outputs(self, pixels):
        import torch

        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return torch.stack(out.hidden_states[1:], dim=1).permute(0, 1, 3, 4, 2)  # [B, L, D, g, g] -> [B, L, g, g, D]


def load(request: LoadRequest) -> VitDetRuntime:
    from transformers import VitDetConfig, VitDetModel

    if request.tiny:
        with seeded(request.seed):
            model = VitDetModel(VitDetConfig(**TINY_CONFIG))
        source_record = {"source": "tiny-random", "seed": request.seed}
    else:
        source = request.source or SOURCE
        if source.local_path is None:
            raise ValueError(f"agent 'vitdet' loads a converted directory: `transagent extract` downloads {URL} and "
                             f"converts it; by hand: `transagent agents convert vitdet <.pkl> DIR`, then "
                             f"--agent-path vitdet=DIR")
        model = load_model(VitDetModel, source, "vitdet")
        source_record = resolved_source(source)
    return VitDetRuntime(model, request.student, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=request.device,
                         dtype=request.dtype, source=source_record)


SPEC = AgentSpec(
    name="vitdet",
    family="vision",
    source=SOURCE,
    preprocessing={
        "value_range": [0, 1], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "resolution": "student image size; abs pos-embed (CLS slot dropped) bicubic and rel-pos linear "
                      "interpolation to the input grid, as detectron2",
        "relative_position": "kept (the official code dropped it)",
        "attention": "windowed blocks attend within windows, as detectron2",
        "tokens": "every block output (the backbone has no CLS token and no final norm), L2-normalised per token",
        "grid": GRID_POLICY,
    },
    emits=("tokens", "token_mean", "views", "tokens_scale"),
    load=load,
    tiny_config=TINY_CONFIG,
    depth=12,
    description="ViTDet-B (detectron2 COCO Mask R-CNN backbone) block outputs (transformers VitDetModel)",
)

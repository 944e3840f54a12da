"""PixArt-α XL/2 512 (text-to-image): cross-attention of the transformer to the class vectors (reference §3.4).

Class vector = T5 v1.1 XXL encoder output for the class prompt (the official per-dataset template, DS_TEMPLATE)
averaged over the prompt's real tokens (the official code averaged over all 120 positions, padding included),
L2-normalised; it passes through PixArt's own caption projection with an all-ones attention mask. All
cross-attention layers are captured; they share one resolution.
"""
from __future__ import annotations

import string

from extract.agents._diffusion import Components, load_components
from extract.agents.base import AgentSpec, LoadRequest
from extract.families.t2i import T2IAgent, latent_size, timesteps
from extract.hub import Source

HUB_ID = "PixArt-alpha/PixArt-XL-2-512x512"
REVISION = "50f702106901db6d0f8b67eb88e814c56ded2692"
IMAGE_SIZE = 512
MAX_TOKENS = 120  # PixArt's T5 context length
CAPTURE = ("transformer_blocks",)

TINY_CONFIG = {
    "image_size": 32,
    "transformer": {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, "caption_channels": 32,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 32, "sample_size": 32,
    },
    "text": {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"},
}


class PixArtAlpha(T2IAgent):
    def __init__(self, *, transformer, vae, text_encoder, tokenizer, image_size: int, device: str,
                 resolved_revision: str | None = None):
        grid = latent_size(vae, image_size) // transformer.config.patch_size
        super().__init__(vae=vae, denoiser=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                         image_size=image_size, device=device, capture_prefixes=CAPTURE, resolutions=(grid * grid,),
                         resolved_revision=resolved_revision)

    def text_features(self, texts):
        batch = self.tokenizer(texts, padding="longest", max_length=MAX_TOKENS, truncation=True,
                               add_special_tokens=True, return_tensors="pt").to(self.device)
        hidden = self.text_encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).float()
        return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)  # mean over real tokens only

    def denoise(self, latents, class_tokens):
        import torch

        batch_size, classes = latents.shape[0], class_tokens.shape[0]
        self.denoiser(
            latents,
            encoder_hidden_states=class_tokens.unsqueeze(0).expand(batch_size, -1, -1),
            encoder_attention_mask=torch.ones(batch_size, classes, device=latents.device),
            timestep=timesteps(batch_size, latents.device),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )


def tiny_tokenizer():
    """A T5 (unigram) tokenizer built in code: T5's special tokens, '▁' and the printable ASCII characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -3.0) for char in string.printable if not char.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def tiny_text_config(tokenizer):
    from transformers import T5Config

    return T5Config(**TINY_CONFIG["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)


def load(request: LoadRequest) -> PixArtAlpha:
    from diffusers import PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

    components = Components("transformer", PixArtTransformer2DModel, T5EncoderModel, T5Tokenizer, tiny_tokenizer,
                            tiny_text_config)
    text_dtype = "bfloat16" if request.dtype == "float16" else None  # T5 v1.1 overflows in float16
    return PixArtAlpha(**load_components(request, SPEC, components, text_dtype), device=request.device)


SPEC = AgentSpec(
    name="pixart",
    family="t2i",
    source=Source(hub_id=HUB_ID, revision=REVISION),
    preprocessing={
        "view": 0, "image_size": IMAGE_SIZE, "resize": "bicubic", "vae_input_range": [-1, 1], "vae_dtype": "float32",
        "latent": "posterior mode * scaling_factor", "timestep": 1, "noise": None,
        "text": f"T5 encoder last_hidden_state, mean over non-padding tokens (max {MAX_TOKENS}), L2-normalised",
        "text_dtype": "bfloat16 when the agent runs in float16",
        "prompt": "the official per-dataset template (DS_TEMPLATE), not caption-cleaned",
        "context": "class vectors through the caption projection, all-ones attention mask",
        "captured": "every transformer block's cross-attention (attn2)",
        "attention": "softmax(q k^T / sqrt(d_head)) over the class tokens, mean over heads",
        "score": "mean map over layers, logsumexp over positions",
    },
    emits=("scores",),
    load=load,
    tiny_config=TINY_CONFIG,
    description="PixArt-α XL/2 512 cross-attention to the class vectors [R=1, C].",
)

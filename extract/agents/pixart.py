"""PixArt-α XL/2 512 (text-to-image): cross-attention of the transformer to the class vectors (reference §3.4).

Class vector = T5 v1.1 XXL encoder output for the class prompt (the official per-dataset template, DS_TEMPLATE)
averaged over the prompt's real tokens (the official code averaged over
all 120 positions, padding included), L2-normalised; it passes through PixArt's own caption projection with an
all-ones attention mask. All cross-attention layers are captured; they share one resolution.
"""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.t2i import T2IAgent, timesteps
from extract.hub import Source, hub_commit
from extract.loading import from_pretrained, load_model, seeded, torch_dtype

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
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
        grid = latent // transformer.config.patch_size
        super().__init__(vae=vae, denoiser=transformer, image_size=image_size, device=device,
                         capture_prefixes=CAPTURE, resolutions=(grid * grid,),
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
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -3.0) for char in string.printable if not char.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def load(request: LoadRequest) -> PixArtAlpha:
    import torch
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    dtype = torch_dtype(request.dtype)
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # T5 v1.1 overflows in float16
    if request.tiny:
        cfg = TINY_CONFIG
        tokenizer = tiny_tokenizer()
        with seeded(request.seed):
            transformer = PixArtTransformer2DModel(**cfg["transformer"])
            vae = AutoencoderKL(**cfg["vae"])
            text_encoder = T5EncoderModel(T5Config(**cfg["text"], vocab_size=len(tokenizer),
                                                   pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=tokenizer.eos_token_id))
        if dtype != torch.float32:  # built in float32; the VAE stays there
            transformer, text_encoder = transformer.to(dtype), text_encoder.to(text_dtype)
        image_size, revision = cfg["image_size"], None
    else:
        source = request.source or SPEC.source
        transformer = load_model(PixArtTransformer2DModel, source, "pixart", subfolder="transformer", dtype=dtype)
        vae = load_model(AutoencoderKL, source, "pixart", subfolder="vae", dtype=torch.float32)
        text_encoder = load_model(T5EncoderModel, source, "pixart", subfolder="text_encoder", dtype=text_dtype)
        tokenizer = from_pretrained(T5Tokenizer.from_pretrained, source, "pixart", subfolder="tokenizer")
        image_size, revision = IMAGE_SIZE, hub_commit(source, "model_index.json")
    return PixArtAlpha(transformer=transformer.to(request.device), vae=vae.to(request.device),
                       text_encoder=text_encoder.to(request.device), tokenizer=tokenizer,
                       image_size=image_size, device=request.device, resolved_revision=revision)


SPEC = AgentSpec(
    name="pixart",
    family="t2i",
    source=Source(hub_id=HUB_ID, revision=REVISION),
    preprocessing={
        "view": 0, "image_size": IMAGE_SIZE, "resize": "bicubic", "vae_input_range": [-1, 1], "vae_dtype": "float32",
        "latent": "posterior mode * scaling_factor", "timestep": 1, "noise": None,
        "text": f"T5 encoder last_hidden_state, mean over non-padding tokens (max {MAX_TOKENS}), L2-normalised",
        "text_dtype": "bfloat16 when the agent runs in float16", "prompt": "the official per-dataset template (DS_TEMPLATE), not caption-cleaned",
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

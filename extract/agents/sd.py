"""Stable Diffusion v1.4 (text-to-image): cross-attention of the UNet to the class vectors (reference §3.3).

Class vector, as the official extractor with `LLM_TEMPLATE: True`: the CLIP ViT-L/14 text encoder's
`last_hidden_state` at the EOT token of each of the class's Vicuna descriptions, averaged over the descriptions and
L2-normalised (option conditioning='vicuna', set by `transagent extract`); where no Vicuna descriptions exist, the
same feature of the class prompt (the official per-dataset template), L2-normalised. Captured layers: the down and
up blocks' cross-attention (the official `up_cross + down_cross`; the mid block is left out), grouped by resolution.
"""
from __future__ import annotations

from extract.agents._diffusion import Components, load_components
from extract.agents.base import AgentSpec, LoadRequest
from extract.families.t2i import T2IAgent, latent_size, timesteps
from extract.hub import Source

HUB_ID = "CompVis/stable-diffusion-v1-4"
REVISION = "133a221b8aa7292a167afc5127cb63fb5005638b"
IMAGE_SIZE = 512
CAPTURE = ("down_blocks", "up_blocks")

TINY_CONFIG = {
    "image_size": 32,
    "unet": {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 32, "sample_size": 32,
    },
    "text": {
        "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
        "max_position_embeddings": 77, "projection_dim": 32,
    },
}


class StableDiffusion(T2IAgent):
    conditionings = ("template", "vicuna")

    def __init__(self, *, unet, vae, text_encoder, tokenizer, image_size: int, device: str,
                 resolved_revision: str | None = None):
        super().__init__(vae=vae, denoiser=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                         image_size=image_size, device=device, capture_prefixes=CAPTURE,
                         resolutions=unet_attention_sizes(unet, vae, image_size, CAPTURE),
                         resolved_revision=resolved_revision)

    def text_features(self, texts):
        import torch

        batch = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").to(self.device)
        hidden = self.text_encoder(input_ids=batch.input_ids).last_hidden_state  # after the final LayerNorm
        eot = (batch.input_ids == self.tokenizer.eos_token_id).int().argmax(dim=1)  # first EOT token
        return hidden[torch.arange(len(texts), device=hidden.device), eot].float()

    def denoise(self, latents, class_tokens):
        batch_size = latents.shape[0]
        context = class_tokens.unsqueeze(0).expand(batch_size, -1, -1)
        self.denoiser(latents, timesteps(batch_size, latents.device), encoder_hidden_states=context)


def unet_attention_sizes(unet, vae, image_size: int, prefixes) -> tuple[int, ...]:
    """HW of each captured UNet resolution: down block i runs at latent/2^i, up block j at latent/2^(n-1-j)."""
    latent = latent_size(vae, image_size)
    sizes = set()
    if "down_blocks" in prefixes:
        sizes |= {(latent // 2**i) ** 2 for i, kind in enumerate(unet.config.down_block_types) if "CrossAttn" in kind}
    if "up_blocks" in prefixes:
        n = len(unet.config.up_block_types)
        sizes |= {(latent // 2 ** (n - 1 - j)) ** 2 for j, kind in enumerate(unet.config.up_block_types)
                  if "CrossAttn" in kind}
    return tuple(sorted(sizes))


def tiny_tokenizer(max_length: int = TINY_CONFIG["text"]["max_position_embeddings"]):
    """A CLIP tokenizer built in code: byte-level BPE without merges (every byte is a token), CLIP's special
    tokens last so that EOT has the largest id, as in the real vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], model_max_length=max_length)


def tiny_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**TINY_CONFIG["text"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def load(request: LoadRequest) -> StableDiffusion:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    components = Components("unet", UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, tiny_tokenizer,
                            tiny_text_config)
    return StableDiffusion(**load_components(request, SPEC, components), device=request.device)


SPEC = AgentSpec(
    name="sd",
    family="t2i",
    source=Source(hub_id=HUB_ID, revision=REVISION),
    preprocessing={
        "view": 0, "image_size": IMAGE_SIZE, "resize": "bicubic", "vae_input_range": [-1, 1], "vae_dtype": "float32",
        "latent": "posterior mode * scaling_factor", "timestep": 1, "noise": None,
        "text": "CLIP last_hidden_state at the first EOT token (77 tokens, truncated), per class the mean over its "
                "texts, L2-normalised",
        "prompt": "per family option 'conditioning': the class's Vicuna descriptions (official LLM_TEMPLATE: True) "
                  "or the official per-dataset template",
        "captured": "down and up blocks' cross-attention (attn2), mid block excluded",
        "attention": "softmax(q k^T / sqrt(d_head)) over the class tokens, mean over heads",
        "score": "per resolution: mean map over layers, logsumexp over positions; smallest resolution first",
    },
    emits=("scores",),
    load=load,
    tiny_config=TINY_CONFIG,
    description="Stable Diffusion v1.4 UNet cross-attention to the class vectors, per resolution [R=3, C].",
)

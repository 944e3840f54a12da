"""Every agent but the 7B ones (vicuna, shikra) with random weights, for the GPU section's extraction figures.

Each builder is its agent module's tiny branch with the configuration as a parameter: `REAL` holds the published
models' shapes (no download: tokenizers are the agents' own built in code), and at tiny shapes the same builders
take the agents' TINY_CONFIG, so the CPU smoke test runs the code a GPU will run. Weights are initialised on the
device itself (a 4.7B T5 encoder would take minutes on a CPU). Model libraries are imported inside the builders:
the GPU section checks first which of them the machine has, and a missing diffusers must only skip sd and pixart.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from extract.agents import bert, blip2, get_agent, pixart, sd
from extract.loading import torch_dtype
from extract.agents.base import AgentSpec, LoadRequest, Source
from pipelines.bench.agents import real_size_load
from pipelines.bench.plans import VISION_AGENTS

NEEDS = {"sd": ("transformers", "diffusers"), "pixart": ("transformers", "diffusers"), "gpt3": ("open_clip",)}

REAL = {
    "bert": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
             "max_position_embeddings": 512, "vocab_size": 30522},   # all-MiniLM-L6-v2
    "sd": {   # Stable Diffusion v1.4: UNet, VAE, CLIP ViT-L/14 text encoder
        "image_size": 512,
        "unet": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 2, "sample_size": 512},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                 "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408},
    },
    "pixart": {   # PixArt-alpha XL/2 512 and its T5 v1.1 XXL encoder
        "image_size": 512,
        "transformer": {"sample_size": 64, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
                        "num_attention_heads": 16, "attention_head_dim": 72, "cross_attention_dim": 1152,
                        "caption_channels": 4096},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                "layers_per_block": 2, "sample_size": 512},
        "text": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
                 "feed_forward_proj": "gated-gelu", "vocab_size": 32128},
    },
    "blip2": {   # BLIP-2 OPT-2.7b: EVA ViT-g, Q-Former, OPT-2.7b
        "image_size": 224, "num_query_tokens": 32,
        "vision": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14},
        "qformer": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "encoder_hidden_size": 1408, "vocab_size": 30522},
        "text": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "word_embed_proj_dim": 2560, "max_position_embeddings": 2048, "vocab_size": 50272},
    },
}
TINY = {"bert": {k: v for k, v in bert.TINY_CONFIG.items() if k != "tokenizer"}, "sd": sd.TINY_CONFIG,
        "pixart": pixart.TINY_CONFIG, "blip2": blip2.TINY_CONFIG}


def random_spec(name: str, real: bool) -> AgentSpec:
    """The registry's spec with a loader of random weights: real-size configurations, or the tiny ones."""
    spec = get_agent(name)
    if name in VISION_AGENTS:
        load = real_size_load(name) if real else spec.load
    elif name == "gpt3":
        load = spec.load   # the student's CLIP text tower, random without pretrained weights at any size
    else:
        config = (REAL if real else TINY)[name]
        load = _on_device(lambda request: BUILDERS[name](config, request))
    return dataclasses.replace(spec, load=load, source=Source(note="bench: random weights"))


def _on_device(build: Callable[[LoadRequest], object]) -> Callable[[LoadRequest], object]:
    def load(request: LoadRequest):
        with torch.random.fork_rng(devices=[]), torch.device(request.device):
            torch.manual_seed(request.seed)
            return build(request)
    return load


def _vocab(config: dict, tokenizer) -> int:
    return max(config.get("vocab_size", 0), len(tokenizer))


def _without(config: dict, *names: str) -> dict:
    return {key: value for key, value in config.items() if key not in names}


def build_bert(config: dict, request: LoadRequest):
    from transformers import BertConfig, BertModel

    tokenizer = bert.tiny_bert_tokenizer()
    model = BertModel(BertConfig(**_without(config, "vocab_size"), vocab_size=_vocab(config, tokenizer),
                                 pad_token_id=tokenizer.pad_token_id), add_pooling_layer=False)
    return bert.BertRuntime(model.to(torch_dtype(request.dtype)), tokenizer, request.device,
                            {"source": "bench: random weights"})


def build_sd(config: dict, request: LoadRequest):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = torch_dtype(request.dtype)
    text = config["text"]
    tokenizer = sd.tiny_tokenizer(text["max_position_embeddings"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **_without(text, "vocab_size"), vocab_size=_vocab(text, tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return sd.StableDiffusion(unet=UNet2DConditionModel(**config["unet"]).to(dtype),
                              vae=AutoencoderKL(**config["vae"]), text_encoder=text_encoder.to(dtype),
                              tokenizer=tokenizer, image_size=config["image_size"], device=request.device)


def build_pixart(config: dict, request: LoadRequest):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    dtype = torch_dtype(request.dtype)
    text = config["text"]
    tokenizer = pixart.tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(**_without(text, "vocab_size"), vocab_size=_vocab(text, tokenizer),
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    text_dtype = torch.bfloat16 if dtype == torch.float16 else dtype   # as the agent: T5 overflows in float16
    return pixart.PixArtAlpha(transformer=PixArtTransformer2DModel(**config["transformer"]).to(dtype),
                              vae=AutoencoderKL(**config["vae"]), text_encoder=text_encoder.to(text_dtype),
                              tokenizer=tokenizer, image_size=config["image_size"], device=request.device)


def build_blip2(config: dict, request: LoadRequest):
    from transformers import Blip2Config, Blip2Model

    tokenizer = blip2.tiny_tokenizer()
    text = dict(_without(config["text"], "vocab_size"), model_type="opt", vocab_size=_vocab(config["text"], tokenizer),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    model = Blip2Model(Blip2Config(vision_config=config["vision"], qformer_config=config["qformer"], text_config=text,
                                   num_query_tokens=config["num_query_tokens"]))
    return blip2.Blip2(model=model.to(torch_dtype(request.dtype)), tokenizer=tokenizer,
                       image_size=config["image_size"], device=request.device)


BUILDERS = {"bert": build_bert, "sd": build_sd, "pixart": build_pixart, "blip2": build_blip2}

"""What the text-to-image agents (SD, PixArt-α) load alike: a diffusers pipeline's denoiser, VAE, text encoder
and tokenizer.

Real weights: each model from its sub-folder of the pipeline at the pinned revision, key-checked
(`extract.loading.load_model`), the tokenizer beside them; the revision recorded is the commit that
`model_index.json` resolved to. Tiny: the same classes built from the agent's TINY_CONFIG under one seed, in the
order denoiser, VAE, text encoder. Either way the VAE runs in float32 and the rest in the compute dtype (the text
encoder may take another: T5 overflows in float16).

Heavy imports stay inside functions: the agent registry imports the agents that use this at CLI start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from extract.agents.base import AgentSpec, LoadRequest
from extract.hub import hub_commit
from extract.loading import from_pretrained, load_model, seeded, torch_dtype

PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline's index: its commit is the pipeline's revision


@dataclass(frozen=True)
class Components:
    """The classes of one agent's pipeline parts (the agent imports them) and how its tiny text side is built."""

    denoiser_folder: str                     # "unet" | "transformer": sub-folder, TINY_CONFIG key, runtime keyword
    denoiser: type                           # a diffusers model class
    text_encoder: type                       # a transformers model class
    tokenizer: type                          # a transformers tokenizer class
    tiny_tokenizer: Callable[[], Any]        # a tokenizer built in code
    tiny_text_config: Callable[[Any], Any]   # tokenizer -> the tiny text encoder's config


def load_components(request: LoadRequest, spec: AgentSpec, components: Components,
                    text_dtype: str | None = None) -> dict[str, Any]:
    """The runtime's keyword arguments: the denoiser (under its folder name), `vae`, `text_encoder` (on
    `request.device`), `tokenizer`, `image_size` and `resolved_revision` (None for tiny or local weights).
    `text_dtype` is the text encoder's compute dtype when it differs from the request's."""
    import torch
    from diffusers import AutoencoderKL

    dtype, text_dtype = torch_dtype(request.dtype), torch_dtype(text_dtype or request.dtype)
    folder = components.denoiser_folder
    if request.tiny:
        cfg = spec.tiny_config
        tokenizer = components.tiny_tokenizer()
        with seeded(request.seed):
            denoiser = components.denoiser(**cfg[folder])
            vae = AutoencoderKL(**cfg["vae"])
            text_encoder = components.text_encoder(components.tiny_text_config(tokenizer))
        denoiser, text_encoder = denoiser.to(dtype), text_encoder.to(text_dtype)  # built in float32, as the VAE stays
        image_size, revision = cfg["image_size"], None
    else:
        source = request.source or spec.source
        denoiser = load_model(components.denoiser, source, spec.name, subfolder=folder, dtype=dtype)
        vae = load_model(AutoencoderKL, source, spec.name, subfolder="vae", dtype=torch.float32)
        text_encoder = load_model(components.text_encoder, source, spec.name, subfolder="text_encoder",
                                  dtype=text_dtype)
        tokenizer = from_pretrained(components.tokenizer.from_pretrained, source, spec.name, subfolder="tokenizer")
        image_size, revision = spec.preprocessing["image_size"], hub_commit(source, PIPELINE_INDEX)
    return {folder: denoiser.to(request.device), "vae": vae.to(request.device),
            "text_encoder": text_encoder.to(request.device), "tokenizer": tokenizer, "image_size": image_size,
            "resolved_revision": revision}

"""Text-to-image agents (SD, PixArt-α): how strongly each class token is attended to, per image.

One un-augmented image (view 0) at the agent's resolution goes through the VAE (input in [-1, 1]; the official
code fed [-3, 1]); the denoiser runs once at t = 1 without noise, with the C class vectors as its C context tokens.
Attention processors on the selected cross-attention layers record softmax(q kᵀ · attn.scale) over the class
tokens (attn.scale = 1/√d_head for both models; the official PixArt code left it out), head-averaged: [B, HW, C].
Maps are averaged within each spatial resolution and reduced by LogSumExp over space, giving scores [R_res, C] per
image, smallest resolution first (SD at 512 px: 16², 32², 64² latent positions; PixArt: its one 32² grid).
Self-attention maps are never kept (reference §10 row 20).

Class vector: by default the agent's text feature of the class prompt (`ctx.template`, the official per-dataset
template). With option conditioning='vicuna' (SD, as the official `LLM_TEMPLATE: True`) it is the per-class mean of
the text features of the class's Vicuna descriptions, L2-normalised; the descriptions come from option
'descriptions' (a file; or, when Vicuna generated them, the vicuna cache's descriptions.json, whose fingerprint is
given as option 'vicuna_cache' and chained into this one).

The softmax runs over the class set in the context, so the scores depend on that set: the class names, the class
set's name and the conditioning text (template, or descriptions) are part of the fingerprint, and each class set
(base, all) has its own cache.

Heavy imports (torch, diffusers) stay inside functions: the agent registry imports this module at CLI start-up.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.views import IMAGE_DECODING_VERSION
from extract.families.inputs import class_prompts, view0_pixels
from extract.families.language import file_sha256, read_descriptions

TEXT_BATCH = 64  # prompts per text-encoder forward (ImageNet has 1000 classes)
CONDITIONINGS = ("template", "vicuna")
OPTIONS = ("conditioning", "descriptions", "vicuna_cache")


# --------------------------------------------------------------------------------------------------------------
# Family protocol (see extract/families/__init__.py)

def rows(ctx) -> list[tuple[str, int]]:
    """T2I agents see only the un-augmented view."""
    return [(key, 0) for key in ctx.keys]


def arrays(runtime, ctx) -> dict[str, ArraySpec]:
    return {"scores": ArraySpec((len(runtime.resolutions), len(ctx.classnames)), "float32")}


def fingerprint_fields(ctx) -> dict:
    # The scores softmax over the class set, so the set itself changes every number.
    fields = {"classnames": list(ctx.classnames), "class_set": ctx.class_set, "view": 0,
              "image_decoding": IMAGE_DECODING_VERSION}
    conditioning = conditioning_of(ctx)
    if conditioning == "template":
        return {**fields, "conditioning": conditioning, "template": ctx.template}
    if "vicuna_cache" in ctx.options:  # generated descriptions: not written yet when this is planned
        return {**fields, "conditioning": conditioning, "vicuna_cache": ctx.options["vicuna_cache"]}
    return {**fields, "conditioning": conditioning,
            "descriptions_sha256": file_sha256(Path(ctx.options["descriptions"]))}


def conditioning_of(ctx) -> str:
    """'template' or 'vicuna' (see the module docstring), with the options that go with it checked."""
    unknown = sorted(set(ctx.options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"t2i: unknown option(s) {unknown}; allowed: {list(OPTIONS)}")
    conditioning = ctx.options.get("conditioning", "template")
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"t2i option 'conditioning' must be one of {CONDITIONINGS}, got {conditioning!r}")
    if conditioning == "vicuna" and "descriptions" not in ctx.options:
        raise ValueError("t2i conditioning 'vicuna' needs option 'descriptions' (the vicuna descriptions file)")
    if conditioning == "template" and {"descriptions", "vicuna_cache"} & set(ctx.options):
        raise ValueError("t2i options 'descriptions' and 'vicuna_cache' belong to conditioning 'vicuna'")
    return conditioning


def class_texts(runtime, ctx) -> list[list[str]]:
    """Per class, the texts whose mean feature is its class vector: the prompt, or its Vicuna descriptions."""
    conditioning = conditioning_of(ctx)
    if conditioning not in runtime.conditionings:
        raise ValueError(f"this agent conditions on {list(runtime.conditionings)}, not {conditioning!r}")
    if conditioning == "template":
        return [[prompt] for prompt in class_prompts(ctx.template, ctx.classnames)]
    path = Path(ctx.options["descriptions"])
    if "vicuna_cache" in ctx.options and not path.is_file():
        raise FileNotFoundError(f"{path}: the descriptions vicuna generated are not there; extract vicuna first "
                                f"(`transagent extract` runs it before sd), or condition on the template with "
                                f"--agent-option sd:conditioning=template")
    descriptions = read_descriptions(path, list(ctx.classnames))
    return [descriptions[name] for name in ctx.classnames]


def extra_files(runtime, ctx) -> dict[str, bytes]:
    return {}


def compute(runtime, rows, ctx) -> dict[str, np.ndarray]:
    """Scores [len(rows), R_res, C] float32 for one batch of (key, 0) rows."""
    keys = [key for key, _ in rows]
    if any(view != 0 for _, view in rows):
        raise ValueError(f"t2i agents only compute view 0, got rows {[r for r in rows if r[1] != 0][:3]}")
    class_tokens = runtime.class_tokens(class_texts(runtime, ctx))
    pixels = view0_pixels(ctx, keys, runtime.image_size)
    return {"scores": runtime.scores(pixels, class_tokens).cpu().numpy().astype(np.float32)}


# --------------------------------------------------------------------------------------------------------------
# Attention capture

class AttentionStore:
    """Running sums of head-averaged cross-attention maps per spatial size, so that memory stays at one [B, HW, C]
    map per resolution however many layers are captured (the official store also kept self-attention)."""

    def __init__(self):
        self.sums: dict[int, object] = {}
        self.counts: dict[int, int] = {}

    def add(self, attention) -> None:
        positions = attention.shape[1]
        if positions in self.sums:
            self.sums[positions] += attention
            self.counts[positions] += 1
        else:
            self.sums[positions], self.counts[positions] = attention.clone(), 1

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def scores(self, resolutions: tuple[int, ...]):
        """[B, R, C]: per resolution (ascending HW), the mean map over its layers, LogSumExp over positions."""
        import torch

        if sorted(self.sums) != sorted(resolutions):
            raise RuntimeError(f"captured cross-attention at {sorted(self.sums)} positions, expected "
                               f"{sorted(resolutions)}")
        means = [self.sums[hw] / self.counts[hw] for hw in sorted(resolutions)]
        return torch.stack([torch.logsumexp(mean, dim=1) for mean in means], dim=1)


class CrossAttentionCapture:
    """A diffusers attention processor: diffusers' `AttnProcessor` that also hands the attention probabilities,
    averaged over heads ([B, query tokens, C], float32), to an `AttentionStore`. The layer's output is computed
    exactly as `AttnProcessor` does, so the denoiser's forward pass is unchanged."""

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        import torch

        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.name}: capture is only for cross-attention layers, this one got no context")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, key_tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_tokens, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)  # softmax over the C keys, scaled by attn.scale
        self.store.add(probs.float().view(batch_size, attn.heads, -1, key_tokens).mean(dim=1))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_capture(denoiser, prefixes: tuple[str, ...], store: AttentionStore) -> tuple[str, ...]:
    """Put a `CrossAttentionCapture` on every cross-attention layer (`attn2`) whose name starts with one of
    `prefixes`; every other layer keeps its processor. Returns the captured layer names."""
    processors = dict(denoiser.attn_processors)
    captured = tuple(name[: -len(".processor")] for name in processors
                     if name.endswith(".attn2.processor") and name.startswith(prefixes))
    if not captured:
        raise ValueError(f"no cross-attention layer starts with {prefixes}; layers: {sorted(processors)[:5]} ...")
    for name in captured:
        processors[name + ".processor"] = CrossAttentionCapture(store, name)
    denoiser.set_attn_processor(processors)
    return captured


# --------------------------------------------------------------------------------------------------------------
# Runtime

class T2IAgent:
    """What `compute` needs from a loaded T2I agent. Subclasses encode texts and call their denoiser once.

    vae, denoiser: diffusers AutoencoderKL and the conditional denoiser; text_encoder, tokenizer: what encodes the
    class texts; image_size: pixels fed to the VAE; resolutions: the spatial sizes (HW) of the captured maps;
    capture_prefixes: which cross-attention layers count; resolved_revision: the hub commit the weights came from
    (recorded in the manifest), None for tiny/local.
    """

    conditionings: tuple[str, ...] = ("template",)   # what its class vectors may be made of (see conditioning_of)

    def __init__(self, *, vae, denoiser, text_encoder, tokenizer, image_size: int, resolutions: tuple[int, ...],
                 capture_prefixes: tuple[str, ...], device: str, resolved_revision: str | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.resolutions = tuple(sorted(resolutions))
        self.device = device
        self.resolved_revision = resolved_revision
        self.store = AttentionStore()
        self.captured_layers = install_capture(self.denoiser, capture_prefixes, self.store)
        self._class_tokens: dict[tuple[str, ...], object] = {}

    def text_features(self, texts: list[str]):
        """[N, d] float32 text features, not normalised (the class vector is normalise(mean over its texts))."""
        raise NotImplementedError

    def denoise(self, latents, class_tokens) -> None:
        """One denoiser forward at t = 1 on `latents` [B, 4, h, w] with the class vectors as context tokens."""
        raise NotImplementedError

    def class_tokens(self, class_texts: list):
        """[C, d] class vectors in the denoiser's dtype, computed once per class set. Item c is class c's prompt or
        its list of texts (e.g. descriptions): vector c = normalise(mean of the texts' features)."""
        groups = tuple((texts,) if isinstance(texts, str) else tuple(texts) for texts in class_texts)
        if groups not in self._class_tokens:
            import torch

            if not all(groups):
                raise ValueError("every class needs at least one text")
            flat = [text for texts in groups for text in texts]
            with torch.no_grad():
                features = torch.cat([self.text_features(flat[i:i + TEXT_BATCH]).float()
                                      for i in range(0, len(flat), TEXT_BATCH)])
            bounds = np.cumsum([0] + [len(texts) for texts in groups])
            means = torch.stack([features[start:end].mean(dim=0)
                                 for start, end in zip(bounds[:-1], bounds[1:], strict=True)])
            self._class_tokens[groups] = l2_normalise(means).to(self.denoiser.dtype)
        return self._class_tokens[groups]

    def latents(self, pixels):
        """VAE posterior mode × scaling factor, for pixels in [-1, 1]."""
        import torch

        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            return posterior.mode() * self.vae.config.scaling_factor

    def scores(self, pixels, class_tokens):
        """[B, R, C] float32: one denoiser pass, its captured maps reduced per resolution."""
        import torch

        self.store.clear()
        try:
            with torch.no_grad():
                self.denoise(self.latents(pixels).to(self.denoiser.dtype), class_tokens)
            return self.store.scores(self.resolutions)
        finally:
            self.store.clear()


def latent_size(vae, image_size: int) -> int:
    """The latent side for `image_size` pixels: the VAE halves the side between its blocks."""
    return image_size // 2 ** (len(vae.config.block_out_channels) - 1)


def timesteps(batch_size: int, device):
    import torch

    return torch.ones(batch_size, dtype=torch.long, device=device)


def l2_normalise(features):
    import torch.nn.functional as F

    return F.normalize(features.float(), dim=-1)

"""The student: a frozen open_clip CLIP with trainable IVLP prompts (reference §4.1, DESIGN §6).

The wrapper runs open_clip's own modules (patch embedding, blocks, norms, projections) and only inserts prompt
tokens between them, so with prompt depth 0 it computes exactly what `CLIP.encode_image` / `CLIP.encode_text`
compute. Prompts (IVLP, as in PromptSRC), each tower with its own token count and depth (`PromptConfig`):

* text: `ctx` [n_ctx_text, text_width] replaces the n_ctx_text token embeddings after SOT of the prompt template
  (initialised from the embeddings of `ctx_init`, "a photo of a"); before text block i (1 <= i < depth_text) those
  positions are overwritten by `text_deep[i-1]`.
* vision: `visual_ctx` [n_ctx_vision, width] is appended after the patch tokens, after the positional embedding
  and before `ln_pre`; before vision block i (1 <= i < depth_vision) the last n_ctx_vision tokens are replaced by
  `visual_deep[i-1]`. Blocks >= depth carry the prompt outputs forward.

Prompts are fp32 master weights, cast to the compute dtype on use. Their random init (N(0, 0.02)) draws from the
global torch RNG, so the caller's run seed decides it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cache_schema.student import StudentGrid
from distill.config import PromptConfig

PROMPT_STD = 0.02


def student_geometry(clip: nn.Module) -> StudentGrid:
    """The grid, widths and depths of an open_clip `CLIP` model, measured (its open_clip name is not needed)."""
    visual = clip.visual
    image_size, patch_size = _side(visual.image_size, "image_size"), _side(visual.patch_size, "patch_size")
    return StudentGrid(
        model=None,
        pretrained=None,
        image_size=image_size,
        patch_size=patch_size,
        width=visual.transformer.width,
        layers=len(visual.transformer.resblocks),
        text_width=clip.transformer.width,
        text_layers=len(clip.transformer.resblocks),
        embed_dim=visual.output_dim,
    )


def _side(size, what: str) -> int:
    """The side of a square size (open_clip stores sizes as pairs); views and caches are square."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise ValueError(f"the student's vision {what} is {height}x{width}; only square inputs are supported "
                         "(views and cached token grids are square)")
    return int(height)


def _check_supported(clip: nn.Module) -> None:
    """The wrapper re-runs open_clip's CLIP forward; refuse architectures whose forward it does not replicate."""
    needed = ("visual", "transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection",
              "attn_mask", "logit_scale")
    missing = [name for name in needed if not hasattr(clip, name)]
    if missing:
        raise TypeError(f"student must be an open_clip CLIP with a built-in text tower (missing {missing}); "
                        f"got {type(clip).__name__} (CustomTextCLIP / HF text towers are not supported)")
    visual = clip.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        raise TypeError(f"student vision tower must be open_clip's VisionTransformer, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise ValueError("student vision tower must pool the class token (pool_type='tok', no attentional pool); "
                         f"got pool_type={visual.pool_type!r}, attn_pool={visual.attn_pool is not None}")
    for name, transformer in (("vision", visual.transformer), ("text", clip.transformer)):
        if not getattr(transformer, "batch_first", True):
            raise ValueError(f"the {name} transformer must run batch-first (open_clip >= 2.24 default)")


def _put_ctx(x: torch.Tensor, ctx: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, N, D] with tokens [start, start + n) replaced by ctx [n, D] (appended when start == N)."""
    ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], ctx, x[:, start + ctx.shape[1]:]], dim=1)


class Student(nn.Module):
    """Frozen open_clip CLIP + IVLP prompts. Only the prompts are parameters that require grad."""

    def __init__(self, clip: nn.Module, tokenizer, prompts: PromptConfig | None = None,
                 classnames: Sequence[str] | None = None):
        super().__init__()
        prompts = prompts or PromptConfig()
        _check_supported(clip)
        self.geometry = student_geometry(clip)
        for tower, depth, blocks, n_ctx in (("vision", prompts.depth_vision, self.geometry.layers,
                                             prompts.n_ctx_vision),
                                            ("text", prompts.depth_text, self.geometry.text_layers,
                                             prompts.n_ctx_text)):
            if not 0 <= depth <= blocks:
                raise ValueError(f"prompt depth_{tower} must be in [0, {blocks}] for this student ({blocks} "
                                 f"{tower} blocks), got {depth}")
            if depth > 0 and n_ctx < 1:
                raise ValueError(f"n_ctx_{tower} must be >= 1 when {tower} prompts are used, got {n_ctx}")
        if prompts.template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {prompts.template!r}")

        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.depth_vision, self.depth_text = prompts.depth_vision, prompts.depth_text
        self.n_ctx_vision = prompts.n_ctx_vision if self.depth_vision > 0 else 0
        self.n_ctx_text = prompts.n_ctx_text if self.depth_text > 0 else 0
        self.template = prompts.template
        self.classnames = list(classnames) if classnames is not None else None
        self._token_cache: tuple[tuple[str, ...], torch.Tensor] | None = None

        # Created in this order whatever the depths, so the seeded init draws the same numbers as it always did.
        device = clip.token_embedding.weight.device
        text_width, width = self.geometry.text_width, self.geometry.width
        self.text_ctx = self.visual_ctx = None
        self.text_deep = nn.ParameterList()
        self.visual_deep = nn.ParameterList()
        if self.depth_text > 0:
            self._check_template_prefix()
            self.text_ctx = nn.Parameter(self._ctx_init(prompts.ctx_init, device))
            self.text_deep.extend(nn.Parameter(_normal(self.n_ctx_text, text_width, device))
                                  for _ in range(self.depth_text - 1))
        if self.depth_vision > 0:
            self.visual_ctx = nn.Parameter(_normal(self.n_ctx_vision, width, device))
            self.visual_deep.extend(nn.Parameter(_normal(self.n_ctx_vision, width, device))
                                    for _ in range(self.depth_vision - 1))

    # ----- construction helpers -----

    def _tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.clip.token_embedding.weight.device)

    def _content_tokens(self, text: str) -> torch.Tensor:
        """Token ids of `text` without SOT/EOT (EOT is the largest id in open_clip's CLIP vocabulary)."""
        ids = self.tokenizer([text])[0]
        return ids[1:int(ids.argmax())]

    def _check_template_prefix(self) -> None:
        prefix = self.template.split("{}")[0].strip()
        count = len(self._content_tokens(prefix)) if prefix else 0
        if count < self.n_ctx_text:
            raise ValueError(f"template {self.template!r} has {count} tokens before the class name, fewer than "
                             f"n_ctx_text={self.n_ctx_text}: the context would overwrite the class name")

    def _ctx_init(self, ctx_init: str | None, device) -> torch.Tensor:
        if not ctx_init:
            return _normal(self.n_ctx_text, self.geometry.text_width, device)
        ids = self._content_tokens(ctx_init)
        if len(ids) != self.n_ctx_text:
            raise ValueError(f"ctx_init {ctx_init!r} is {len(ids)} tokens but n_ctx_text={self.n_ctx_text}; "
                             "pass a phrase of n_ctx_text tokens or ctx_init=None for random init")
        with torch.no_grad():
            return self.clip.token_embedding(ids.to(device)).float().clone()

    # ----- parameters and checkpoints -----

    def train(self, mode: bool = True):
        """Prompts follow `mode`; the frozen CLIP always stays in eval mode (no dropout, no patch dropout)."""
        super().train(mode)
        self.clip.eval()
        return self

    def named_prompts(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if not name.startswith("clip.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompts only (the CLIP weights are frozen and come from `pretrained`)."""
        return {name: p.detach().clone() for name, p in self.named_prompts().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.named_prompts()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"prompt checkpoint does not fit this student (depth vision/text {self.depth_vision}/"
                             f"{self.depth_text}, n_ctx vision/text {self.n_ctx_vision}/{self.n_ctx_text}): "
                             f"missing {missing}, unexpected {unexpected}")
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"prompt {name!r}: checkpoint shape {tuple(state[name].shape)} != "
                                 f"student shape {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name])

    # ----- text tower -----

    def tokenize(self, classnames: Sequence[str]) -> torch.Tensor:
        """Token ids [C, context_length] of the template filled with each class name (the last set is cached)."""
        names = tuple(classnames)
        if not names:
            raise ValueError("at least one class name is needed")
        if self._token_cache is None or self._token_cache[0] != names:
            self._token_cache = (names, self._tokenize([self.template.format(n) for n in names]))
        return self._token_cache[1]

    def encode_text(self, classnames_or_tokens: Sequence[str] | torch.Tensor | None = None) -> torch.Tensor:
        """Class text features [C, embed_dim] (not normalised, like open_clip's `encode_text`).

        Takes class names (filled into the template) or token ids [C, context_length]; with prompts, token
        positions 1..n_ctx_text (after SOT) are replaced by the context. None = the class names given at build time.
        """
        if classnames_or_tokens is None:
            if self.classnames is None:
                raise ValueError("no class names: pass them to encode_text or to build_student(classnames=...)")
            classnames_or_tokens = self.classnames
        if isinstance(classnames_or_tokens, torch.Tensor):
            tokens = classnames_or_tokens
        elif isinstance(classnames_or_tokens, str):
            raise TypeError("encode_text takes a sequence of class names, not a single string")
        else:
            tokens = self.tokenize(classnames_or_tokens)

        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype)
        if self.depth_text > 0:
            x = _put_ctx(x, self.text_ctx, 1)
        x = x + clip.positional_embedding.to(cast_dtype)
        for i, block in enumerate(clip.transformer.resblocks):
            if 1 <= i < self.depth_text:
                x = _put_ctx(x, self.text_deep[i - 1], 1)
            x = block(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = _text_pool(clip, x, tokens)
        return _project(x, clip.text_projection)

    # ----- vision tower -----

    def encode_image(self, pixels: torch.Tensor, return_tokens: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image features [B, embed_dim] (not normalised) and, if asked, every block's patch tokens.

        tokens: [L, B, T, width], the output of each vision block with the CLS and prompt tokens removed,
        L2-normalised per token (what the vision agents' caches hold).
        """
        visual, n = self.clip.visual, self.n_ctx_vision
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        num_patches = x.shape[1] - 1
        if self.depth_vision > 0:
            x = _put_ctx(x, self.visual_ctx, x.shape[1])
        x = visual.ln_pre(x)

        tokens = []
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i < self.depth_vision:
                x = _put_ctx(x, self.visual_deep[i - 1], x.shape[1] - n)
            x = block(x)
            if return_tokens:
                tokens.append(F.normalize(x[:, 1:1 + num_patches], dim=-1))

        if visual.final_ln_after_pool:
            pooled = visual.ln_post(x[:, 0])
        else:
            pooled = visual.ln_post(x)[:, 0]
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, (torch.stack(tokens) if return_tokens else None)

    # ----- logits -----

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale.exp() * cosine [B, C] (+ logit_bias if the model has one), as open_clip's `get_logits`."""
        image_features = F.normalize(image_features, dim=-1)
        text_features = F.normalize(text_features, dim=-1)
        logits = self.clip.logit_scale.exp() * image_features @ text_features.T
        if getattr(self.clip, "logit_bias", None) is not None:
            logits = logits + self.clip.logit_bias
        return logits


def _normal(rows: int, cols: int, device) -> torch.Tensor:
    return torch.empty(rows, cols, device=device).normal_(std=PROMPT_STD)


def _text_pool(clip: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    from open_clip.transformer import text_global_pool

    return text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


def build_student(model_name: str, pretrained: str | None, prompts: PromptConfig | None = None,
                  classnames: Sequence[str] | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> Student:
    """Create the open_clip model (pretrained tag or checkpoint path) and wrap it with prompts.

    `pretrained=None` builds random weights seeded with 0 in a forked RNG, so two builds are identical and the
    caller's RNG stream is untouched (prompt init still draws from the caller's RNG). A pretrained tag trained
    with QuickGELU (e.g. "openai") gets it; a checkpoint *path* of OpenAI weights needs the "-quickgelu" model
    name (e.g. "ViT-B-16-quickgelu"), since open_clip cannot tell from a path.
    """
    import open_clip

    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model(model_name, pretrained=None, precision=precision, device="cpu")
        clip = clip.to(device)
    else:
        # open_clip 3.x only warns when a tag was trained with QuickGELU (OpenAI weights) but the config says
        # GELU ("ViT-B-16" + "openai"); follow the tag so the weights run with the activation they were trained with.
        tag = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        clip = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device,
                                      force_quick_gelu=bool(tag.get("quick_gelu", False)), require_pretrained=True)
    tokenizer = open_clip.get_tokenizer(model_name)
    return Student(clip, tokenizer, prompts, classnames)

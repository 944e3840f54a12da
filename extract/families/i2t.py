"""Image-to-text agents (BLIP-2, Shikra): how well each class's text matches the image in the agent's LLM space.

One un-augmented image (view 0) at 224 px, normalised as the agent's own processor does, gives one projected image
feature; each class prompt (the official per-dataset template, DS_TEMPLATE) gives one LLM text feature, the mean of
the last hidden states over its real tokens (the official code averaged padding too). Both are L2-normalised; the
score is their cosine. A class's score does not depend on the other classes, so one cache over all classes serves
every class subset by slicing: the class set is not part of the fingerprint, the class names and template are.

Heavy imports (torch, transformers) stay inside functions: the agent registry imports this module at CLI start-up.
"""
from __future__ import annotations

import numpy as np

from cache_schema.arrays import ArraySpec
from cache_schema.views import IMAGE_DECODING_VERSION
from extract.families.inputs import class_prompts, view0_pixels

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_BATCH = 64  # prompts per LLM forward (ImageNet has 1000 classes)


# --------------------------------------------------------------------------------------------------------------
# Family protocol (see extract/families/__init__.py)

def rows(ctx) -> list[tuple[str, int]]:
    """I2T agents see only the un-augmented view."""
    return [(key, 0) for key in ctx.keys]


def arrays(runtime, ctx) -> dict[str, ArraySpec]:
    return {
        "scores": ArraySpec((len(ctx.classnames),), "float32"),
        "image_features": ArraySpec((runtime.feature_dim,), "float32"),
    }


def fingerprint_fields(ctx) -> dict:
    # Per-class scores: any class subset is a slice, so the class set's name stays out.
    return {"classnames": list(ctx.classnames), "template": ctx.template, "view": 0,
            "image_decoding": IMAGE_DECODING_VERSION}


def extra_files(runtime, ctx) -> dict[str, bytes]:
    return {}


def compute(runtime, rows, ctx) -> dict[str, np.ndarray]:
    """scores [len(rows), C] and image_features [len(rows), d], float32, for one batch of (key, 0) rows."""
    keys = [key for key, _ in rows]
    if any(view != 0 for _, view in rows):
        raise ValueError(f"i2t agents only compute view 0, got rows {[r for r in rows if r[1] != 0][:3]}")
    text = runtime.class_features(class_prompts(ctx.template, ctx.classnames))
    image = runtime.image_features(view0_pixels(ctx, keys, runtime.image_size, runtime.mean, runtime.std))
    return {"scores": (image @ text.T).cpu().numpy(), "image_features": image.cpu().numpy()}


# --------------------------------------------------------------------------------------------------------------
# Runtime

class I2TAgent:
    """What `compute` needs from a loaded I2T agent. Subclasses encode images and prompts.

    tokenizer: the LLM's tokenizer; image_size and mean/std: the agent's image preprocessing; feature_dim: size of
    the shared feature space; device/dtype: where and in which precision the image encoder runs;
    resolved_revision: the hub commit the weights came from (recorded in the manifest), None for tiny/local.
    """

    def __init__(self, *, tokenizer, image_size: int, feature_dim: int, device: str, dtype, mean=CLIP_MEAN,
                 std=CLIP_STD, resolved_revision: str | None = None):
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.feature_dim = int(feature_dim)
        self.device, self.dtype = device, dtype
        self.resolved_revision = resolved_revision
        self.mean, self.std = tuple(mean), tuple(std)
        self._class_features: dict[tuple[str, ...], object] = {}

    def encode_images(self, pixels):
        """[B, d] image features (before normalisation) for normalised pixels [B, 3, S, S]."""
        raise NotImplementedError

    def encode_prompts(self, input_ids, attention_mask):
        """[C, T, d] last hidden states of the LLM for tokenised prompts."""
        raise NotImplementedError

    def image_features(self, pixels):
        """[B, d] float32, L2-normalised."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return F.normalize(self.encode_images(pixels.to(self.device, self.dtype)).float(), dim=-1)

    def class_features(self, prompts: list[str]):
        """[C, d] float32, L2-normalised: last hidden states averaged over each prompt's real tokens."""
        import torch
        import torch.nn.functional as F

        key = tuple(prompts)
        if key not in self._class_features:
            self.tokenizer.padding_side = "right"  # causal LLMs: real tokens keep positions 0..n-1
            means = []
            for start in range(0, len(prompts), TEXT_BATCH):
                batch = self.tokenizer(list(prompts[start:start + TEXT_BATCH]), padding=True,
                                       return_tensors="pt").to(self.device)
                with torch.no_grad():
                    hidden = self.encode_prompts(batch.input_ids, batch.attention_mask).float()
                mask = batch.attention_mask.unsqueeze(-1).float()
                means.append((hidden * mask).sum(dim=1) / mask.sum(dim=1))
            self._class_features[key] = F.normalize(torch.cat(means), dim=-1)
        return self._class_features[key]

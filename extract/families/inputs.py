"""What the single-view families (t2i, i2t) feed their agents: each image's un-augmented view, the class prompts.

torch is imported inside functions: the runner imports the family modules to recognise a complete cache.
"""
from __future__ import annotations

import numpy as np

from cache_schema.views import apply_view, load_rgb, view_params


def class_prompts(template: str, classnames) -> list[str]:
    if "{}" not in template:
        raise ValueError(f"prompt template must contain '{{}}' for the class name, got {template!r}")
    return [template.format(name) for name in classnames]


def view0_pixels(ctx, keys, size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """View 0 of each image at size x size, normalised: float tensor [B, 3, size, size]. The default mean/std map
    [0, 1] to [-1, 1], the VAE's input range."""
    import torch

    batch = []
    for key in keys:
        image = load_rgb(ctx.image_path(key))
        view = apply_view(image, view_params(key, 0, image.width, image.height, ctx.view_spec), size)
        batch.append(np.asarray(view, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy((np.stack(batch) - mean) / std)

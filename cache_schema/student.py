"""The student as both stages must agree on it.

Stage 1 encodes class names with the student's open_clip text tower (`model`, `pretrained`) and pools vision rows
to its patch grid; stage 2 builds the gates and pairs L_VAC's layers to its widths and depths. A cache records what
its rows depend on (the model for language rows, the image size and grid for vision rows) in its fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudentGrid:
    model: str | None          # open_clip architecture name (None: measured from a built model, not named)
    pretrained: str | None     # open_clip pretrained tag or checkpoint path; None = random init (seeded)
    image_size: int            # the square input, in pixels
    patch_size: int
    width: int                 # vision transformer width = token dimension
    layers: int                # vision blocks
    text_width: int | None = None    # the text tower and the joint image-text space: known once the model is built
    text_layers: int | None = None
    embed_dim: int | None = None

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

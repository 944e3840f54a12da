"""The student as extraction sees it: a leaf of `extract/`, so that families and agents both describe it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudentInfo:
    """What agents must know about the student: its open_clip model (for text encoding) and its token grid."""

    model: str
    pretrained: str | None
    image_size: int
    patch_size: int
    width: int
    layers: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

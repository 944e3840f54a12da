"""Views: the augmented crops that both stages must agree on, pixel for pixel.

A view is (key, view id) -> crop box + flip. Its parameters come from `numpy.random.default_rng` seeded with
sha256(key | view id | view seed), so any process on any machine draws the same box. View 0 is the un-augmented
view (the centre square, i.e. resize-shortest-side + centre-crop). Stage 1 stores the parameters next to the
rows; stage 2 rebuilds the student's input from them with the same `apply_view`.

Pixels come from one decoder, `decode_rgb`, in both stages. Its version is part of the fingerprint of every cache
made from pixels, so caches of another decoding are never mixed with this one's.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

VIEW_FIELDS = ("x0", "y0", "width", "height", "flip")
# 1: Pillow's convert("RGB") (16-bit grey clipped: 99.6% of a typical 16-bit PNG turned white);
# 2: 16-bit images scaled to 8 bits. Bump when `decode_rgb` changes what any image decodes to.
IMAGE_DECODING_VERSION = 2
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ViewSpec:
    """RandomResizedCrop(scale, ratio) + horizontal flip, as in the CoOp/Dassl training transform."""

    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    version: int = 1  # bump when the sampling algorithm changes: it is part of every vision fingerprint

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ViewSpec":
        return cls(seed=data["seed"], scale=tuple(data["scale"]), ratio=tuple(data["ratio"]), flip=data["flip"],
                   version=data["version"])


def _rng(key: str, view_id: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{key}|{view_id}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def view_params(key: str, view_id: int, width: int, height: int, spec: ViewSpec = ViewSpec()) -> np.ndarray:
    """(x0, y0, width, height, flip) as int32 for an image of the given size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image {key!r} has an empty size {width}x{height}")
    if view_id < 0:
        raise ValueError(f"view id must be >= 0, got {view_id}")
    if view_id == 0:
        side = min(width, height)
        return np.array([(width - side) // 2, (height - side) // 2, side, side, 0], dtype=np.int32)
    rng = _rng(key, view_id, spec.seed)
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            box = (x0, y0, w, h)
            break
    if box is None:  # fall back to a centre crop with the aspect ratio clamped into range
        in_ratio = width / height
        if in_ratio < spec.ratio[0]:
            w, h = width, int(round(width / spec.ratio[0]))
        elif in_ratio > spec.ratio[1]:
            h, w = height, int(round(height * spec.ratio[1]))
        else:
            w, h = width, height
        box = ((width - w) // 2, (height - h) // 2, w, h)
    flip = int(spec.flip and rng.uniform() < 0.5)
    return np.array([*box, flip], dtype=np.int32)


def decode_rgb(image):
    """8-bit RGB of a PIL image. 16-bit grey (and 32-bit integer, read as 16-bit) is scaled by 255/65535 with
    rounding; Pillow's own conversion clips it at 255."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def load_rgb(path):
    """The image at `path`, fully decoded to 8-bit RGB (`decode_rgb`); errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return decode_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from None


def apply_view(image, params, size: int):
    """Crop, resize (bicubic) to size x size and flip a PIL image. The one place both stages build pixels."""
    x0, y0, w, h, flip = (int(v) for v in params)
    view = decode_rgb(image).resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return view

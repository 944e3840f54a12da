"""The `synthetic` dataset: coloured shapes and textures, generated on demand, byte-identical everywhere.

Each class is a colour plus a pattern ("red circle", "blue horizontal stripes", ...), so a tiny CLIP can learn
it from colour alone while the pattern keeps crops meaningful. Images are 48x40 (deliberately not square).
Determinism: pixels come from integer arithmetic on a numpy Generator seeded by (seed, label, index), and the PNG
is written here with stored (uncompressed) deflate blocks, so no zlib version or timestamp can change the bytes.
"""
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from pipelines.datasets.errors import DatasetError
from pipelines.datasets.images import missing_images
from pipelines.datasets.registry import DATASETS
from pipelines.datasets.splitfile import SPLITS, encode_split, write_atomic

WIDTH, HEIGHT = 48, 40
SEED = 0
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "purple": (120, 50, 170),
    "white": (235, 235, 235), "brown": (130, 80, 35),
}
PATTERNS = ("circle", "square", "horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
            "dots", "triangle", "ring", "cross")
MAX_CLASSES = len(COLOURS) * len(PATTERNS)


def class_names(num_classes: int) -> list[str]:
    """Class c = colour c mod 10 with pattern (c + c // 10) mod 10: the first 10 differ in colour and pattern."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DatasetError(f"synthetic: num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    colours = list(COLOURS)
    return [f"{colours[c % len(colours)]} {PATTERNS[(c + c // len(colours)) % len(PATTERNS)]}"
            for c in range(num_classes)]


def _mask(pattern: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    cx = int(rng.integers(WIDTH // 2 - 6, WIDTH // 2 + 7))
    cy = int(rng.integers(HEIGHT // 2 - 5, HEIGHT // 2 + 6))
    half = int(rng.integers(2, 5))             # stripe half-period
    phase = int(rng.integers(0, 10))
    size = int(rng.integers(9, 14))            # shape radius / half side
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    if pattern == "circle":
        return d2 <= size * size
    if pattern == "ring":
        return (d2 <= (size + 2) ** 2) & (d2 >= (size - 2) ** 2)
    if pattern == "square":
        return (abs(x - cx) <= size - 2) & (abs(y - cy) <= size - 2)
    if pattern == "triangle":
        top = cy - size
        return (y >= top) & (y <= cy + size) & (abs(x - cx) <= (y - top) // 2 + 1)
    if pattern == "cross":
        return (((abs(x - cx) <= 2) & (abs(y - cy) <= size + 2)) | ((abs(y - cy) <= 2) & (abs(x - cx) <= size + 2)))
    if pattern == "horizontal stripes":
        return ((y + phase) // half) % 2 == 0
    if pattern == "vertical stripes":
        return ((x + phase) // half) % 2 == 0
    if pattern == "diagonal stripes":
        return ((x + y + phase) // half) % 2 == 0
    if pattern == "checkerboard":
        return (((x + phase) // (half + 3)) + ((y + cx) // (half + 3))) % 2 == 0
    if pattern == "dots":
        period = half + 6
        return ((x + phase) % period - period // 2) ** 2 + ((y + cy) % period - period // 2) ** 2 <= 4
    raise ValueError(f"unknown pattern {pattern!r}")


def render(label: int, index: int, seed: int = SEED) -> np.ndarray:
    """Image `index` of class `label`: uint8 [HEIGHT, WIDTH, 3]."""
    colour_name, pattern = class_names(label + 1)[label].split(" ", 1)
    rng = np.random.default_rng([seed, label, index])
    mask = _mask(pattern, rng)[..., None]
    background = rng.integers(30, 90) + rng.integers(-12, 13, size=(HEIGHT, WIDTH, 3))
    colour = np.array(COLOURS[colour_name]) + rng.integers(-20, 21, size=3)
    foreground = colour + rng.integers(-10, 11, size=(HEIGHT, WIDTH, 3))
    return np.clip(np.where(mask, foreground, background), 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes: filter 0 rows in stored deflate blocks, no ancillary chunks."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, dtype=np.uint8))
    stream = bytearray(b"\x78\x01")
    for start in range(0, len(raw), 65535):
        block = raw[start:start + 65535]
        final = start + 65535 >= len(raw)
        stream += bytes([final]) + struct.pack("<HH", len(block), 0xFFFF ^ len(block)) + block
    stream += struct.pack(">I", zlib.adler32(raw))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(stream)) + chunk(b"IEND", b"")


def synthetic_split(num_classes: int = 10, per_class: tuple[int, int, int] = (24, 8, 12)) -> dict:
    """Class c's images 0.. are train, then val, then test; keys `<class_folder>/<index>.png`."""
    if len(per_class) != 3 or min(per_class) < 1:
        raise DatasetError(f"synthetic: per_class is (train, val, test) counts >= 1, got {per_class}")
    split = {name: [] for name in SPLITS}
    for label, name in enumerate(class_names(num_classes)):
        folder = name.replace(" ", "_")
        index = 0
        for split_name, count in zip(SPLITS, per_class, strict=True):
            for _ in range(count):
                split[split_name].append((f"{folder}/{index:04d}.png", label, name))
                index += 1
    return split


def make_synthetic(data_root, num_classes: int = 10, per_class: tuple[int, int, int] = (24, 8, 12)) -> Path:
    """Generate `<data_root>/synthetic/` unless an identical one is there; returns the split file path.

    The split file is written last, so an interrupted generation is redone on the next call.
    """
    info = DATASETS["synthetic"]
    split = synthetic_split(num_classes, tuple(per_class))
    split_bytes = encode_split(split)
    split_path, image_root = info.split_path(data_root), info.image_root(data_root)
    keys = [key for name in SPLITS for key, _, _ in split[name]]
    if split_path.exists() and split_path.read_bytes() == split_bytes and not missing_images(image_root, keys):
        return split_path
    for name in SPLITS:
        for key, label, _ in split[name]:
            path = image_root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(render(label, int(Path(key).stem))))
    descriptions = split_path.parent / "descriptions" / "gpt3.json"
    descriptions.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(descriptions, (json.dumps(class_descriptions(class_names(num_classes)), indent=1) + "\n").encode())
    write_atomic(split_path, split_bytes)
    return split_path


def class_descriptions(classnames: list[str]) -> dict[str, list[str]]:
    """CuPL-style descriptions, so the language agents have a descriptions file to read on this dataset too."""
    out = {}
    for name in classnames:
        colour, pattern = name.split(" ", 1)
        out[name] = [f"a {colour} {pattern} on a dark background.", f"an image whose main colour is {colour}.",
                     f"a simple {pattern} pattern painted in {colour}."]
    return out

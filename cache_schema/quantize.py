"""int8 storage for token arrays, the one codec of both stages: symmetric, one float32 scale per token (the last
axis is quantised), q = round(x / scale) with scale = max|x| / 127.

An all-zero token is stored with scale 1 (its q are 0 whatever the scale), as stage 1 has always written it, so a
cache's scales are what this codec computes from its tokens."""
import numpy as np


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float32)
    scale = np.abs(values).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(values / scale[..., None]), -127, 127).astype(np.int8)
    return quantized, scale


def dequantize_int8(quantized: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
    return (quantized.astype(np.float32) * scale[..., None]).astype(dtype, copy=False)

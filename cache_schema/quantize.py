"""int8 storage for token arrays: symmetric, one float32 scale per token (the last axis is quantised)."""
import numpy as np


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float32)
    scale = np.abs(values).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    quantized = np.clip(np.rint(values / safe[..., None]), -127, 127).astype(np.int8)
    return quantized, scale.astype(np.float32)


def dequantize_int8(quantized: np.ndarray, scale: np.ndarray, dtype=np.float32) -> np.ndarray:
    return (quantized.astype(np.float32) * scale[..., None]).astype(dtype, copy=False)

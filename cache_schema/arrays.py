"""Array specifications: every cached array is a stack of rows, one row per (key, view id)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = ("float16", "float32", "int8", "int32")


@dataclass(frozen=True)
class ArraySpec:
    row_shape: tuple[int, ...]  # shape of one row; the array is [R, *row_shape]
    dtype: str                  # one of DTYPES, stored little-endian

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "row_shape", tuple(int(d) for d in self.row_shape))

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.numpy_dtype.itemsize

    def to_dict(self) -> dict:
        return {"row_shape": list(self.row_shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict) -> "ArraySpec":
        return cls(tuple(data["row_shape"]), data["dtype"])

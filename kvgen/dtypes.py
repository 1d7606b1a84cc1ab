"""One table describing every element type kvgen knows, shared by validation, rendering and the reference.

Keeping the C spelling, byte width, FP8 range and TMA data type side by side means a new dtype is one row
here rather than a hunt through templates and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

CacheDType = Literal["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]
IODType = Literal["float32", "float16", "bfloat16"]
ScaleDType = Literal["float32", "float8_e8m0fnu"]


@dataclass(frozen=True)
class DTypeInfo:
    name: str
    c_type: str  # spelling in CUDA C++
    nbytes: int
    numpy: np.dtype
    is_fp8: bool
    fp8_max: float  # largest finite value (0 for non-FP8)
    tma_type: str | None  # CUtensorMapDataType suffix, or None when TMA cannot move it
    short: str  # used in variant names


DTYPES: dict[str, DTypeInfo] = {
    "float32": DTypeInfo("float32", "float", 4, np.dtype(np.float32), False, 0.0, "FLOAT32", "f32"),
    "float16": DTypeInfo("float16", "__half", 2, np.dtype(np.float16), False, 0.0, "FLOAT16", "f16"),
    "bfloat16": DTypeInfo(
        "bfloat16", "__nv_bfloat16", 2, np.dtype(ml_dtypes.bfloat16), False, 0.0, "BFLOAT16", "bf16"
    ),
    # TMA only moves bytes, so e4m3 travels as UINT8. MAX's TensorMapDataType.from_dtype rejects e5m2;
    # kvgen follows it so a config never relies on a path MAX does not have.
    "float8_e4m3fn": DTypeInfo(
        "float8_e4m3fn", "__nv_fp8_e4m3", 1, np.dtype(ml_dtypes.float8_e4m3fn), True, 448.0, "UINT8", "e4m3"
    ),
    "float8_e5m2": DTypeInfo(
        "float8_e5m2", "__nv_fp8_e5m2", 1, np.dtype(ml_dtypes.float8_e5m2), True, 57344.0, None, "e5m2"
    ),
    "float8_e8m0fnu": DTypeInfo(
        "float8_e8m0fnu", "kvgen::e8m0_t", 1, np.dtype(np.uint8), False, 0.0, "UINT8", "e8m0"
    ),
}


def info(name: str) -> DTypeInfo:
    return DTYPES[name]

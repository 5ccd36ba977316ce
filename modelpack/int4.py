"""INT4 row-wise quantization in FBGEMM TBE's row layout.

Each stored row is `[fp16 scale][fp16 bias][dim/2 bytes]`, element 2i in the low nibble
and 2i+1 in the high nibble; value = nibble * scale + bias. The arithmetic follows
FBGEMM's reference quantizer (`FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`) step by
step in float32 so the bytes are identical to `FloatToFusedNBitRowwiseQuantizedSBHalf`
(which keeps the same two fp16 values at the row's end instead of its start).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

QPARAM_BYTES = 4  # fp16 scale + fp16 bias
_LEVELS = np.float32(15.0)
FP16_MAX = 65504.0


def row_bytes(dim: int) -> int:
    """Bytes of one packed INT4 row of `dim` elements."""
    check_dim(dim)
    return QPARAM_BYTES + dim // 2


def check_dim(dim: int) -> None:
    """Raise unless `dim` is usable: even for INT4, and a multiple of 4 for FBGEMM."""
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"INT4 needs a positive even embedding dim (two values per byte), got dim={dim}"
        )
    if dim % 4:
        # FBGEMM's kernels read the nibble bytes as fp16-aligned words.
        raise ValueError(f"FBGEMM's INT4 kernels need dim divisible by 4, got dim={dim}")


def quantize_rows(x: npt.NDArray[np.floating], *, name: str = "matrix", row_offset: int = 0
                  ) -> npt.NDArray[np.uint8]:
    """Quantize a float32/float16 (R, D) matrix into packed INT4 rows (R, 4 + D/2).

    `name` and `row_offset` only make error messages point at the right table and row.
    Raises ValueError on odd D and on NaN/Inf values (naming the first bad row).
    """
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (rows, dim) array, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"{name}: expected float32 or float16, got {x.dtype}")
    rows, dim = x.shape
    check_dim(dim)
    xf = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(xf).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name}: row {row_offset + bad} holds NaN or Inf; refusing to quantize "
            "a model with non-finite weights"
        )
    too_big = (np.abs(xf) > FP16_MAX).any(axis=1)
    if too_big.any():
        bad = int(np.flatnonzero(too_big)[0])
        raise ValueError(
            f"{name}: row {row_offset + bad} has a value beyond fp16's range (|x| > {FP16_MAX}); "
            "INT4 rows keep scale and bias in fp16"
        )
    out = np.empty((rows, QPARAM_BYTES + dim // 2), dtype=np.uint8)
    if rows == 0:
        return out
    # bias is the fp16-rounded minimum, and the range is taken from that rounded value.
    bias16 = xf.min(axis=1).astype(np.float16)
    bias = bias16.astype(np.float32)
    rng = xf.max(axis=1) - bias
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = np.where(rng == 0, np.float32(1.0), rng / _LEVELS).astype(np.float32)
        scale16 = scale.astype(np.float16)
        scale = scale16.astype(np.float32)
        scale = np.where(scale == 0, np.float32(1.0), scale)
        inv = (np.float32(1.0) / scale).astype(np.float32)
        overflow = np.isinf(inv)
        scale = np.where(overflow, np.float32(1.0), scale)
        inv = np.where(overflow, np.float32(1.0), inv)
        q = np.rint((xf - bias[:, None]) * inv[:, None])
    nib = np.clip(q, 0, 15).astype(np.uint8)
    out[:, 0:2] = scale.astype(np.float16).view(np.uint8).reshape(rows, 2)
    out[:, 2:4] = bias16.view(np.uint8).reshape(rows, 2)
    out[:, 4:] = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return out


def dequantize_rows(packed: npt.NDArray[np.uint8], dim: int) -> npt.NDArray[np.float32]:
    """Dequantize packed INT4 rows (R, 4 + D/2) back to float32 (R, D)."""
    check_dim(dim)
    if packed.ndim != 2 or packed.shape[1] != QPARAM_BYTES + dim // 2:
        raise ValueError(
            f"packed INT4 rows for dim={dim} must have shape (R, {QPARAM_BYTES + dim // 2}), "
            f"got {packed.shape}"
        )
    if packed.dtype != np.uint8:
        raise ValueError(f"packed INT4 rows must be uint8, got {packed.dtype}")
    packed = np.ascontiguousarray(packed)
    rows = packed.shape[0]
    scale = packed[:, 0:2].copy().view(np.float16).astype(np.float32)
    bias = packed[:, 2:4].copy().view(np.float16).astype(np.float32)
    body = packed[:, QPARAM_BYTES:]
    nib = np.empty((rows, dim), dtype=np.float32)
    nib[:, 0::2] = body & 0x0F
    nib[:, 1::2] = body >> 4
    return nib * scale + bias


def to_fbgemm_layout(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Move scale/bias from the row's start (TBE layout) to its end (FBGEMM quantizer layout)."""
    return np.concatenate([packed[:, QPARAM_BYTES:], packed[:, :QPARAM_BYTES]], axis=1)

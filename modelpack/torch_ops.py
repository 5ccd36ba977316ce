"""INT4 dequantization and bag pooling in plain torch ops, for CPU and CUDA alike.

The ranker's GPU path has no FBGEMM, so it dequantizes packed rows with these; the
offline scorer uses the same functions, which is why the two agree bit for bit on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_rows_torch(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 (R, 4 + dim/2) packed rows -> float32 (R, dim), on packed's device."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != 4 + dim // 2:
        raise ValueError(
            f"packed rows for dim={dim} must be uint8 (R, {4 + dim // 2}), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    qparams = packed[:, :4].contiguous().view(torch.float16).to(torch.float32)  # (R, 2)
    body = packed[:, 4:]
    nib = torch.stack((body & 0x0F, body >> 4), dim=2).reshape(packed.shape[0], dim)
    return nib.to(torch.float32) * qparams[:, 0:1] + qparams[:, 1:2]


def pool_bags(values: torch.Tensor, offsets: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool consecutive rows of `values` (R, D) into bags given offsets (B + 1,); empty -> 0."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {mode!r}")
    idx = torch.arange(values.shape[0], device=values.device)
    return F.embedding_bag(idx, values, offsets, mode=mode, include_last_offset=True)

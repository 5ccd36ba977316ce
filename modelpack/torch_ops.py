"""INT4 dequantization and bag pooling in plain torch ops, for CPU and CUDA alike.

The ranker's GPU path has no FBGEMM, so it dequantizes packed rows with these; the
offline scorer uses the same functions, which is why the two agree bit for bit on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
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


@dataclass(frozen=True)
class Bags:
    """A batch's sparse features as ONE set of bags over ONE array of packed rows (host side).

    Built on the host so a device receives it in three copies and pools it with a handful
    of kernels whatever the number of features (one copy and one dequantize per feature,
    each with its own offsets copy, was launch-bound and synchronized on every feature).
    """

    rows: npt.NDArray[np.uint8]  # (R, row_bytes): feature 0's rows, then feature 1's, ...
    offsets: npt.NDArray[np.int64]  # (B + 1,): bag b pools rows[offsets[b]:offsets[b + 1]]
    scale: npt.NDArray[np.float32]  # (B,): 1 / bag length for mean pooling (empty: 1), 1 for sum
    spans: tuple[tuple[int, int], ...]  # per feature: its bags are [start, end)


def plan_bags(poolings: Sequence[str], offsets: Sequence[npt.NDArray[np.int64]],
              packed: Sequence[npt.NDArray[np.uint8]]) -> Bags:
    """Per feature: its pooling mode, its bag offsets (entities + 1, over its own rows) and
    its packed rows -> one Bags. Row counts are checked here, on the host: a device gather
    does not bounds-check, and a bad offset there is an illegal memory access."""
    if not len(poolings) == len(offsets) == len(packed):
        raise ValueError(f"{len(poolings)} poolings, {len(offsets)} offsets, {len(packed)} packed")
    spans, offs, scales = [], [np.zeros(1, dtype=np.int64)], []
    base = bags = 0
    for mode, o, p in zip(poolings, offsets, packed, strict=True):
        if mode not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {mode!r}")
        if o.size < 1 or o[0] != 0 or o[-1] != p.shape[0] or np.any(np.diff(o) < 0):
            raise ValueError(f"bag offsets must rise from 0 to the {p.shape[0]} rows given")
        lengths = np.diff(o)
        offs.append(o[1:] + base)
        scales.append(1.0 / np.maximum(lengths, 1) if mode == "mean"
                      else np.ones(lengths.size))
        spans.append((bags, bags + lengths.size))
        base, bags = base + p.shape[0], bags + lengths.size
    rows = np.concatenate(packed) if len(packed) > 1 else np.ascontiguousarray(packed[0])
    return Bags(rows, np.concatenate(offs), np.concatenate(scales).astype(np.float32), tuple(spans))


def pool_bags(rows: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor, dim: int
              ) -> torch.Tensor:
    """Dequantize packed rows (R, 4 + dim/2) and pool them into bags: (B, dim) float32, on
    rows' device. Sum pooling scaled per bag (mean = sum / length); an empty bag is 0."""
    if rows.shape[0] == 0:
        return torch.zeros((scale.shape[0], dim), dtype=torch.float32, device=rows.device)
    values = dequantize_rows_torch(rows, dim)
    idx = torch.arange(values.shape[0], device=values.device)
    pooled = F.embedding_bag(idx, values, offsets, mode="sum", include_last_offset=True)
    return pooled * scale.unsqueeze(1)

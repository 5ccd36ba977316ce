"""One table as a server shard serves it: its row range, one mapped segment per file it spans.

A shard's rows [start, stop) need not lie inside one file: any number of server shards
can serve any export (its `num_shards` files), so resharding needs no re-export. Each
file part of the range is a segment: a read-only view of the mapped file with its own
one-table FBGEMM kernel. One TBE with several tables would need all of them in one
weights buffer (a table is an offset into `weights_host`), i.e. a copy of the files.

Rows are routed to segments by file with modelpack.lookup's split_rows / gather_rows.
A bag whose rows lie in several segments is pooled per segment as FP32 sums and combined
(`lookup_parts`, which a delta overlay uses too), the mean dividing at the end, as
embedding_server.client combines shards. A range
inside one file (the usual case) takes the single-kernel path with no routing at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt
import torch

from embedding_server.fbgemm_tbe import Int4Kernel, Output, Pooling
from modelpack.hashing import shard_bounds
from modelpack.lookup import Packed, gather_rows, split_rows
from modelpack.schema import TableSpec

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Segment:
    """The part of a shard's range that lies in file `file` of the table."""

    file: int  # file shard index (spec.shard_path(file))
    start: int  # global row of weights[0]
    weights: torch.Tensor  # uint8 (rows, row_bytes), a view of the mapped file
    kernel: Int4Kernel  # reads `weights`, no copy

    @property
    def stop(self) -> int:
        return self.start + int(self.weights.shape[0])

    @cached_property
    def packed(self) -> Packed:
        """`weights` as numpy: np.take gathers packed rows in ~0.65x torch.index_select's CPU
        time here (4096-16384 rows of 20 bytes)."""
        out: Packed = self.weights.numpy()
        return out

    def take(self, local: npt.NDArray[np.int64]) -> Packed:
        """Packed rows at local row indices, all in range (checked by the caller)."""
        out: Packed = np.take(self.packed, local, axis=0, mode="clip")  # "clip": no second check
        return out


@dataclass
class ServedTable:
    """A table's rows [start, stop) on this shard: contiguous segments in file order."""

    spec: TableSpec
    start: int
    stop: int
    segments: tuple[Segment, ...]
    _by_file: dict[int, Segment] = field(init=False, repr=False)
    _file_start: npt.NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        edges = [self.start, *(s.stop for s in self.segments)]
        if [s.start for s in self.segments] != edges[:-1] or edges[-1] != self.stop:
            spans = [(s.start, s.stop) for s in self.segments]
            raise ValueError(f"table {self.spec.name!r}: segments {spans} do not tile rows "
                             f"[{self.start}, {self.stop})")
        self._by_file = {s.file: s for s in self.segments}
        self._file_start = shard_bounds(self.spec.rows, self.spec.num_shards)

    @property
    def nbytes(self) -> int:
        """Mapped table bytes (what the memory budget counts)."""
        return sum(int(s.weights.numel()) for s in self.segments)

    def _only_segment(self, rows: npt.NDArray[np.int64]) -> Segment | None:
        """The segment holding all of `rows`, if one does (always, for a range inside one file)."""
        if len(self.segments) == 1 or not rows.size:
            return self.segments[0]
        # Two reductions spare a request whose rows happen to share a file the routing
        # (split_rows: ~0.1-0.4 ms for 8k rows, a stable argsort).
        lo, hi = int(rows.min()), int(rows.max())
        return next((s for s in self.segments if s.start <= lo and hi < s.stop), None)

    def gather(self, rows: npt.NDArray[np.int64]) -> Packed:
        """Packed INT4 rows of global row ids, all within [start, stop) (not checked here)."""
        if (s := self._only_segment(rows)) is not None:
            return s.take(rows - s.start if s.start else rows)

        def take(k: int, file_rows: npt.NDArray[np.int64]) -> Packed:
            seg = self._by_file[k]  # file_rows are local to file k, whose row 0 is global _file_start[k]
            return seg.take(file_rows + (int(self._file_start[k]) - seg.start))

        return gather_rows(rows, self.spec.rows, self.spec.num_shards, self.spec.row_bytes, take)

    def lookup(self, rows: npt.NDArray[np.int64], offsets: torch.Tensor | None, pooling: Pooling,
               output: Output) -> torch.Tensor:
        """Dequantized rows (offsets None: one row per bag) or pooled bags, (bags, dim).

        rows: global row ids within [start, stop); offsets: int64 (bags + 1), validated.
        """
        if (s := self._only_segment(rows)) is not None:
            off = torch.arange(rows.size + 1, dtype=torch.int64) if offsets is None else offsets
            return s.kernel.lookup(torch.from_numpy(rows - s.start if s.start else rows), off,
                                   pooling, output)
        return lookup_parts(self.parts(rows), rows.size, self.spec.dim, offsets, pooling, output)

    def parts(self, rows: npt.NDArray[np.int64], at: npt.NDArray[np.int64] | None = None) -> list[Part]:
        """`rows` (global, within [start, stop)) routed to the segments holding them; `at`:
        their (ascending) positions in the request, default 0..n-1."""
        at = np.arange(rows.size, dtype=np.int64) if at is None else at
        if (s := self._only_segment(rows)) is not None:
            return [Part(at, s.kernel, rows - s.start)]
        out = []
        for k, pos in enumerate(split_rows(rows, self._file_start)):
            if pos.size:
                seg = self._by_file[k]
                out.append(Part(at[pos], seg.kernel, rows[pos] - seg.start))
        return out


@dataclass(frozen=True)
class Part:
    """Some of a request's rows read through one kernel: where they are in the request
    (ascending) and their rows local to the kernel's table."""

    pos: npt.NDArray[np.int64]
    kernel: Int4Kernel
    local: npt.NDArray[np.int64]


def lookup_parts(parts: Sequence[Part], num_rows: int, dim: int, offsets: torch.Tensor | None,
                 pooling: Pooling, output: Output) -> torch.Tensor:
    """A lookup whose rows are split over several kernels (files of a range, or an overlay
    and the base): unpooled rows scattered back in request order; bags pooled per part as
    FP32 sums and combined, the mean dividing at the end."""
    if offsets is None:
        # numpy's row scatter: torch's index_put/index_copy_ are several times slower here.
        out = np.empty((num_rows, dim), dtype=np.float16 if output == "fp16" else np.float32)
        for p in parts:
            one_each = torch.arange(p.pos.size + 1, dtype=torch.int64)
            out[p.pos] = p.kernel.lookup(torch.from_numpy(p.local), one_each, "sum", output).numpy()
        return torch.from_numpy(out)
    bounds = offsets.numpy()
    total: torch.Tensor | None = None
    for p in parts:
        # A part's rows before each bag boundary: its positions are ascending, so one
        # binary search per bag (no per-row bag ids).
        part_offsets = torch.from_numpy(np.searchsorted(p.pos, bounds).astype(np.int64, copy=False))
        sums = p.kernel.lookup(torch.from_numpy(p.local), part_offsets, "sum", "fp32")
        total = sums if total is None else total.add_(sums)
    if total is None:  # no parts: no rows, every bag empty
        total = torch.zeros((int(offsets.numel()) - 1, dim), dtype=torch.float32)
    if pooling == "mean":
        total.div_(torch.diff(offsets).clamp_(min=1).unsqueeze_(1))
    return total if output == "fp32" else total.to(_DTYPES[output])

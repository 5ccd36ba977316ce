"""A version's rows at one delta seq on this shard: the mapped base plus an in-memory overlay.

A state holds, per table, the rows that deltas 1..seq replaced inside this shard's range
[start, stop), folded (each row's latest bytes): sorted global row ids, their packed INT4
rows, an FBGEMM kernel over those rows (dequantized and pooled outputs) and a bitset over
[start, stop). The bitset is what keeps a lookup whose rows hit no replaced row almost
free: one gather of bytes and a few vectorized ops over the request's rows, no search.
The base files are never written. States are immutable: applying a delta builds a new one
(a sorted merge of the newest state with the delta) that the registry then publishes by
swapping a reference, so a lookup sees a whole state or the one before.

What a read returns is modelpack.delta_read.overlay_rows exactly (packed) and the
dequantize-then-pool of those rows (pooled): rows hitting the overlay are read through
the overlay's kernel, the rest through the base segments, and a bag mixing both is pooled
per part as FP32 sums and combined (served_table.lookup_parts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch

from embedding_server.fbgemm_tbe import Int4Kernel, Output, Pooling
from embedding_server.served_table import Part, ServedTable, lookup_parts
from modelpack.delta_read import TableDelta, fold
from modelpack.lookup import Packed

Rows = npt.NDArray[np.int64]
Words = npt.NDArray[np.int64]
A = TypeVar("A", bound=npt.NDArray[np.generic])


def _bitset(local: Rows, size: int) -> Words:
    """Bits set at `local` (sorted unique, in [0, size)), bit i of word i // 64 = row i."""
    words = np.zeros((size + 63) // 64, dtype=np.uint64)
    if local.size:
        word = local >> 6
        first = np.flatnonzero(np.diff(word, prepend=-1))  # where each word's run starts (sorted)
        one = np.uint64(1)
        words[word[first]] = np.bitwise_or.reduceat(one << (local & 63).astype(np.uint64), first)
    return words.view(np.int64)


def _own(a: A) -> A:
    """`a` if it owns its (writable, C-ordered) memory, else a copy that does."""
    if a.base is None and a.flags.writeable and a.flags.c_contiguous:
        return a
    return cast(A, np.array(a, order="C"))


@dataclass(frozen=True)
class Hits:
    """The rows of one request that an overlay replaces."""

    pos: npt.NDArray[np.intp]  # their positions in the request, ascending
    index: Rows  # their rows in the overlay (`packed`, the kernel)


@dataclass(frozen=True)
class TableOverlay:
    """One table's replaced rows on this shard at one seq (at least one row).

    Membership is one bit per row of [start, stop) in 64-bit words, and a replaced row's
    place in `packed` is its rank: the set bits before it (`rank` per word, popcount
    within it), so a request costs a handful of vectorized ops and no binary search."""

    start: int  # the shard's first row of the table (bit 0)
    rows: Rows  # sorted unique global rows in [start, stop)
    packed: Packed  # uint8 (rows, row_bytes), C-contiguous
    words: Words  # the bitset over [start, stop)
    rank: npt.NDArray[np.int64]  # set bits in words[:w], per word w
    kernel: Int4Kernel = field(repr=False)

    @classmethod
    def build(cls, name: str, dim: int, start: int, stop: int, rows: Rows, packed: Packed
              ) -> TableOverlay:
        # Own copies: a slice of a delta's arrays would keep the whole delta (every shard's
        # rows) alive, uncounted; a merge's output is already its own.
        rows, packed = _own(rows), _own(packed)
        kernel = Int4Kernel(name, int(rows.size), dim, torch.from_numpy(packed))
        words = _bitset(rows - start, stop - start)
        rank = np.zeros(words.size, dtype=np.int64)
        np.cumsum(np.bitwise_count(words.view(np.uint64))[:-1], out=rank[1:])  # popcount of raw bits
        return cls(start, rows, packed, words, rank, kernel)

    @property
    def nbytes(self) -> int:
        """What the overlay costs in memory (counted in the shard's budget)."""
        return int(self.rows.nbytes + self.packed.nbytes + self.words.nbytes + self.rank.nbytes)

    def delta(self) -> TableDelta:
        return TableDelta(self.rows, self.packed)

    def hits(self, local: Rows) -> Hits | None:
        """Which of a request's rows (`local` = row - start, all in range) the overlay
        replaces, and where they are in it; None when none are (the cheap case)."""
        # Signed words (bit 63 shifts in ones, & 1 still reads it): int64 indices and
        # shifts take numpy's fast paths, and nonzero is fastest on a bool array.
        w = local >> 6
        word = np.take(self.words, w)
        bit = local & 63
        pos = np.flatnonzero(((word >> bit) & 1).astype(bool))
        if not pos.size:
            return None
        below = word[pos] & ((1 << bit[pos]) - 1)  # the row's word, the bits before it
        return Hits(pos, np.take(self.rank, w[pos]) + np.bitwise_count(below))

    def patch(self, base: Packed, hits: Hits) -> Packed:
        """Packed answer: `base` (V's rows for the request) with the hits replaced."""
        if not base.flags.writeable:
            base = base.copy()
        base[hits.pos] = np.take(self.packed, hits.index, axis=0)
        return base

    def lookup(self, table: ServedTable, global_rows: Rows, hits: Hits,
               offsets: torch.Tensor | None, pooling: Pooling, output: Output) -> torch.Tensor:
        """Dequantized or pooled answer: hit rows from the overlay's kernel, the rest from V."""
        idx = torch.from_numpy(hits.index)
        if offsets is None:  # every row through V's kernel at once, then the hits replaced
            out = table.lookup(global_rows, None, "sum", output)
            one_each = torch.arange(hits.pos.size + 1, dtype=torch.int64)
            out.numpy()[hits.pos] = self.kernel.lookup(idx, one_each, "sum", output).numpy()
            return out
        miss = np.ones(global_rows.size, dtype=bool)
        miss[hits.pos] = False
        miss_pos = np.flatnonzero(miss)
        parts = [Part(hits.pos, self.kernel, hits.index)]
        if miss_pos.size:
            parts += table.parts(global_rows[miss_pos], miss_pos)
        return lookup_parts(parts, global_rows.size, table.spec.dim, offsets, pooling, output)


def merge(old: TableDelta, new: TableDelta) -> TableDelta:
    """`old` with `new` applied (both sorted unique): the union of rows, `new`'s bytes where
    both have a row. Two searchsorted passes and scatters, no sort of the union."""
    if not old.rows.size:
        return new
    if not new.rows.size:
        return old
    at = np.searchsorted(old.rows, new.rows)
    replaced = at[old.rows[np.minimum(at, old.rows.size - 1)] == new.rows]
    keep = np.ones(old.rows.size, dtype=bool)
    keep[replaced] = False
    kept_rows = old.rows[keep]
    n = kept_rows.size + new.rows.size
    rows = np.empty(n, dtype=np.int64)
    packed = np.empty((n, new.packed.shape[1]), dtype=np.uint8)
    # Final index of each element: its own index plus how many of the other array precede it.
    old_at = np.arange(kept_rows.size) + np.searchsorted(new.rows, kept_rows)
    new_at = np.arange(new.rows.size) + np.searchsorted(kept_rows, new.rows)
    rows[old_at], rows[new_at] = kept_rows, new.rows
    packed[old_at], packed[new_at] = old.packed[keep], new.packed
    return TableDelta(rows, packed)


@dataclass(frozen=True)
class OverlayState:
    """A version readable at `seq` on this shard: its overlays by table (none at seq 0)."""

    seq: int
    link: str  # fingerprint of delta `seq`'s manifest (the version's own at seq 0): the chain
    tables: Mapping[str, TableOverlay] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())

    @property
    def num_rows(self) -> int:
        return sum(int(t.rows.size) for t in self.tables.values())


def advance(base: OverlayState, served: Mapping[str, ServedTable],
            deltas: Sequence[Mapping[str, TableDelta]]) -> tuple[dict[str, TableDelta], int]:
    """Each table's folded rows once `deltas` (verified, in seq order, global rows) are
    applied on top of `base`, restricted to this shard's range, and how many delta rows
    fell in that range. Arrays only: nothing indexed yet."""
    parts: dict[str, list[TableDelta]] = {}
    for d in deltas:
        for name, td in d.items():
            t = served[name]
            mine = td.within(t.start, t.stop)
            if mine.rows.size:
                parts.setdefault(name, []).append(mine)
    out = {name: t.delta() for name, t in base.tables.items()}
    applied = 0
    for name, p in parts.items():
        folded = fold(p)
        applied += int(folded.rows.size)
        out[name] = merge(out[name], folded) if name in out else folded
    return out, applied


def overlay_bytes(tables: Mapping[str, TableDelta], served: Mapping[str, ServedTable]) -> int:
    """What build_state will hold for these arrays: rows, bytes and a bitset per table."""
    return sum(d.nbytes + (served[n].stop - served[n].start + 7) // 8 for n, d in tables.items())


def build_state(seq: int, link: str, tables: Mapping[str, TableDelta],
                served: Mapping[str, ServedTable]) -> OverlayState:
    """Index merged arrays (kernels and bitsets) into an immutable state."""
    built = {}
    for name, d in tables.items():
        t = served[name]
        built[name] = TableOverlay.build(name, t.spec.dim, t.start, t.stop, d.rows, d.packed)
    return OverlayState(seq, link, built)

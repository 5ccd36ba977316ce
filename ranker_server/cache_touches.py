"""Which delta seqs touched which rows of one table: the row cache's exactness rule.

A read at (V, s) of row r returns V's row with the last delta <= s that lists r laid
over it (modelpack.delta_read.overlay_rows). So the bytes read at seq e are also the
bytes at every seq s in [lo, hi], where lo is the last delta <= e touching r (0: none)
and hi is one before the first delta > e touching r (OPEN: none learned yet). The cache
keeps that interval per entry; this module computes it.

Every (row, seq) touch is one int64 key `row << shift | seq`, kept sorted, so an
interval is one vectorized searchsorted. `shift` leaves the row its bits (num_rows) and
the seq the rest; a seq that does not fit (2^44 for a million-row table) is not cached.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.int64]
OPEN = np.iinfo(np.int64).max  # valid until a delta not yet learned touches the row


class Touches:
    """The learned deltas' row lists of one table of one version, as sorted touch keys."""

    def __init__(self, num_rows: int) -> None:
        self.shift = 63 - max(1, int(num_rows - 1).bit_length())
        self.max_seq = (1 << self.shift) - 1
        self._mask = np.int64(self.max_seq)
        self._keys: Rows = np.empty(0, np.int64)

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes)

    def fits(self, seq: int) -> bool:
        return 0 <= seq <= self.max_seq

    def add(self, seq: int, rows: Rows) -> None:
        """Delta `seq` (newer than every seq added so far) touched `rows` (sorted, unique)."""
        if not self.fits(seq):
            raise ValueError(f"seq {seq} does not fit the touch keys (max {self.max_seq})")
        new = (np.asarray(rows, np.int64) << self.shift) | np.int64(seq)
        self._keys = np.sort(np.concatenate([self._keys, new]))

    def interval(self, rows: Rows, seq: int) -> tuple[Rows, Rows]:
        """Per row, [lo, hi]: the seqs whose reads of it equal the read at `seq`."""
        rows = np.asarray(rows, np.int64)
        keys = self._keys
        lo = np.zeros(rows.size, np.int64)
        hi = np.full(rows.size, OPEN, np.int64)
        if keys.size == 0 or rows.size == 0:
            return lo, hi
        i = np.searchsorted(keys, (rows << self.shift) | np.int64(seq), side="right")
        prev = keys[np.maximum(i - 1, 0)]
        mine = (i > 0) & ((prev >> self.shift) == rows)
        lo[mine] = prev[mine] & self._mask
        nxt = keys[np.minimum(i, keys.size - 1)]
        later = (i < keys.size) & ((nxt >> self.shift) == rows)
        hi[later] = (nxt[later] & self._mask) - 1
        return lo, hi

"""Admission and eviction of the row cache, chosen for Zipf traffic.

Two policies, compared on the demo's day-1 traffic by loadtest/bench/cache_mrc.py:

- `lru`: every miss is admitted, the least recently used entries make room (sampled:
  the oldest of 16 random slots per victim, as Redis approximates LRU).
- `tinylfu` (the default): a miss takes an LRU victim's place only if the frequency
  sketch has seen it more often than that victim (TinyLFU, Einziger et al. 2017). One-off
  rows of the long tail then stop pushing hot rows out; free space is always filled.

The sketch is a count-min sketch (4 rows of 16-bit counters, 4-8 per cache entry)
counting batches that asked for a row; every `10 * entries` counts all counters are
halved, so yesterday's hot rows fade. Everything here is vectorized over a batch.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

Policy = Literal["lru", "tinylfu"]
POLICIES: tuple[Policy, ...] = ("lru", "tinylfu")
_DEPTH = 4
# Odd 64-bit multipliers (splitmix64's and golden-ratio constants): one hash per sketch row.
_SEEDS = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB,
                   0xD6E8FEB86659FD93], dtype=np.uint64)
_ROW_MIX = np.uint64(0xFF51AFD7ED558CCD)
_SAMPLES = 16  # slots sampled per victim needed: the oldest of 16 is in the oldest ~6%


class FrequencySketch:
    """How often each (table key, row) was asked for, approximately, with aging."""

    def __init__(self, entries: int) -> None:
        width = 1 << max(10, (max(1, 4 * entries) - 1).bit_length())
        self._bits = np.uint64(64 - (width.bit_length() - 1))
        self._counts = np.zeros((_DEPTH, width), np.uint16)
        self._sample = max(1000, 10 * entries)
        self._added = 0

    def _slots(self, key: int, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        h = rows.astype(np.uint64) * _ROW_MIX + np.uint64(key) * _SEEDS[0]
        h ^= h >> np.uint64(29)
        slots: npt.NDArray[np.uint64] = (h[None, :] * _SEEDS[:, None]) >> self._bits
        return slots  # (depth, n), each < width

    def add(self, key: int, rows: npt.NDArray[np.int64]) -> None:
        """Count one ask for each of `rows` (unique within the call)."""
        if rows.size == 0:
            return
        slots = self._slots(key, rows)
        for d in range(_DEPTH):
            c = self._counts[d]
            c[slots[d]] = np.minimum(c[slots[d]].astype(np.uint32) + 1, 0xFFFF)
        self._added += rows.size
        if self._added >= self._sample:
            self._counts >>= 1
            self._added //= 2

    def estimate(self, key: int, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint16]:
        if rows.size == 0:
            return np.empty(0, np.uint16)
        slots = self._slots(key, rows)
        est: npt.NDArray[np.uint16] = np.min(
            np.stack([self._counts[d][slots[d]] for d in range(_DEPTH)]), axis=0)
        return est


def lru_victims(used_at: npt.NDArray[np.int64], key: npt.NDArray[np.int64], now: int, k: int,
                rng: np.random.Generator, samples: int = _SAMPLES) -> npt.NDArray[np.intp]:
    """Up to `k` occupied slots (key >= 0) not used at tick `now`: the least recently used
    of a random sample of `samples * k` slots (Redis' approximated LRU), so a batch's
    eviction costs O(k), not a pass over the whole cache."""
    n = used_at.size
    exhaustive = samples * k >= n
    pick = np.arange(n) if exhaustive else rng.integers(0, n, samples * k)
    pick = pick[(key[pick] >= 0) & (used_at[pick] < now)]
    if pick.size > k:
        pick = pick[np.argpartition(used_at[pick], k - 1)[:k]]
    # A sample may repeat a slot: each victim once (a few fewer than k, then).
    victims: npt.NDArray[np.intp] = (pick if exhaustive else np.unique(pick)).astype(np.intp)
    return victims


def admit_over(candidate_freq: npt.NDArray[np.uint16], victim_freq: npt.NDArray[np.uint16]
               ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """TinyLFU's duel, over a batch: the most asked-for candidates meet the least asked-for
    victims; a candidate wins only if asked for strictly more often. Returns the winning
    candidates' and the displaced victims' positions, paired."""
    n = min(candidate_freq.size, victim_freq.size)
    cand = np.argsort(-candidate_freq.astype(np.int32), kind="stable")[:n]
    vict = np.argsort(victim_freq, kind="stable")[:n]
    wins = candidate_freq[cand] > victim_freq[vict]
    return cand[wins], vict[wins]

"""The ranker's cache of hot packed INT4 rows, on its device, exact at every delta seq.

Entries are keyed by (version fingerprint, table, row) and hold the row's packed bytes in
one slab on the device (GPU memory on CUDA, host memory on the CPU), sized in bytes.
Each entry records the seqs its bytes are valid for, [lo, hi] (cache_touches.py): a read
at (V, s) uses it only if lo <= s <= hi, i.e. no delta between the seq it was read at and
s touched that row, in either direction (an advance, or a revert to an older seq). That
needs every delta up to s known: `learn` takes each delta's row lists in order (the
source reads them before the ranker switches seq) and frees the entries they touch; a read
at a seq not learned yet bypasses the cache. `drop` forgets a retired version's entries.
Nothing is ever flushed globally.

Host-side bookkeeping (numpy): per slot its table key, row, [lo, hi] and last use; per
(version, table) an int32 slot per table row (4 bytes per row while the version is open).
One row width per cache (set by the first row admitted: a model's tables share one dim);
tables of another width are read through, uncached, and counted as bypassed. Callers
hold no lock: every method takes the cache's own, since the source's `open_seq` runs on
a worker thread while the event loop reads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ranker_server.cache_policy import FrequencySketch, Policy, admit_over, lru_victims
from ranker_server.cache_touches import OPEN, Rows, Touches


@dataclass
class CacheStats:
    """Counters of one version (base units: rows, bytes, lookups)."""

    requested_hits: int = 0  # rows asked for, repeats within a batch included
    requested_misses: int = 0
    unique_hits: int = 0  # each row once per table per batch: what the wire would carry
    unique_misses: int = 0
    wire_saved_bytes: int = 0  # answer bytes plus 8-byte row ids not sent
    lookups_skipped: int = 0  # batches whose rows all hit: no RPC at all
    evictions: int = 0  # entries pushed out to make room
    invalidations: int = 0  # entries freed because a learned delta touched their row
    bypassed_rows: int = 0  # unique rows read through uncached (seq not learned, other width)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Table:
    key: int
    num_rows: int
    slot_of: npt.NDArray[np.int32]  # table row -> slot, -1: not cached
    touches: Touches


@dataclass
class _Version:
    name: str
    learned: int = 0  # deltas 1..learned are known: reads up to this seq may use entries
    tables: dict[str, _Table] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)


class RowCache:
    """See the module docstring."""

    def __init__(self, capacity_bytes: int, policy: Policy, device: torch.device) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.device = device
        self.width = 0  # row bytes; 0 until the first admission sizes the slab
        self.slots = 0
        self._lock = threading.Lock()
        self._versions: dict[str, _Version] = {}
        self._tables: dict[int, tuple[_Version, _Table]] = {}
        self._next_key = 0
        self._tick = 0
        self._slab = torch.empty((0, 0), dtype=torch.uint8, device=device)
        self._key = np.empty(0, np.int64)  # per slot: table key, -1 free
        self._row = np.empty(0, np.int64)
        self._lo = np.empty(0, np.int64)
        self._hi = np.empty(0, np.int64)
        self._used_at = np.empty(0, np.int64)
        self._sketch: FrequencySketch | None = None
        self._free_slots = 0  # slots with key -1 (a scan for free ones only when some are)
        self._rng = np.random.default_rng(0)  # eviction samples: reproducible runs

    # -- versions and deltas -------------------------------------------------------------

    def open(self, fingerprint: str, name: str) -> None:
        """Serve a version (at seq 0 until deltas are learned); already open: kept."""
        with self._lock:
            self._versions.setdefault(fingerprint, _Version(name))

    def learned(self, fingerprint: str) -> int:
        with self._lock:
            v = self._versions.get(fingerprint)
            return -1 if v is None else v.learned

    def learn(self, fingerprint: str, seq: int, tables: dict[str, tuple[int, Rows]]) -> int:
        """Delta `seq` (the one after the last learned) touched these rows, per table
        ({table: (num_rows, sorted unique rows)}); frees their entries. Returns how many."""
        with self._lock:
            v = self._versions[fingerprint]
            if seq != v.learned + 1:
                raise ValueError(f"learn delta {seq} of {v.name}: {v.learned} is the last learned")
            freed = 0
            for name, (num_rows, rows) in tables.items():
                t = self._table(v, fingerprint, name, num_rows)
                if not t.touches.fits(seq):
                    raise ValueError(f"{v.name} table {name}: seq {seq} too large to cache")
                t.touches.add(seq, rows)
                slots = t.slot_of[np.asarray(rows, np.int64)]
                freed += self._free(slots[slots >= 0].astype(np.intp))
            v.learned = seq
            v.stats.invalidations += freed
            return freed

    def drop(self, fingerprint: str) -> int:
        """Forget a retired version: its entries, row maps and delta touches."""
        with self._lock:
            v = self._versions.pop(fingerprint, None)
            if v is None:
                return 0
            keys = [t.key for t in v.tables.values()]
            for k in keys:
                del self._tables[k]
            slots = np.flatnonzero(np.isin(self._key, keys))
            self._key[slots] = -1
            self._free_slots += int(slots.size)
            return int(slots.size)

    def _table(self, v: _Version, fingerprint: str, name: str, num_rows: int) -> _Table:
        t = v.tables.get(name)
        if t is None:
            t = _Table(self._next_key, num_rows, np.full(num_rows, -1, np.int32),
                       Touches(num_rows))
            self._next_key += 1
            v.tables[name] = t
            self._tables[t.key] = (v, t)
        elif t.num_rows != num_rows:
            raise ValueError(f"{v.name} table {name}: {num_rows} rows, cached as {t.num_rows}")
        return t

    # -- reads ---------------------------------------------------------------------------

    def read(self, fingerprint: str, table: str, num_rows: int, unique: Rows, seq: int,
             counts: npt.NDArray[np.int64], width: int
             ) -> tuple[npt.NDArray[np.bool_], torch.Tensor | None]:
        """Which of `unique` (sorted unique rows read at `seq`, each asked `counts` times)
        hit, and their bytes gathered on the device (a copy: later writes cannot change
        it). Counts the lookup and feeds the admission policy."""
        with self._lock:
            v = self._versions.get(fingerprint)
            miss = np.zeros(unique.size, bool)
            if v is None:
                return miss, None
            if seq > v.learned or (self.width and width != self.width):
                v.stats.bypassed_rows += unique.size
                return miss, None
            t = self._table(v, fingerprint, table, num_rows)
            self._tick += 1
            if self._sketch is not None:
                self._sketch.add(t.key, unique)
            slots = t.slot_of[unique].astype(np.intp)
            hit = slots >= 0
            hit[hit] = (self._lo[slots[hit]] <= seq) & (seq <= self._hi[slots[hit]])
            got = slots[hit]
            self._used_at[got] = self._tick
            s = v.stats
            n_hit = int(got.size)
            s.unique_hits += n_hit
            s.unique_misses += unique.size - n_hit
            req_hit = int(counts[hit].sum())
            s.requested_hits += req_hit
            s.requested_misses += int(counts.sum()) - req_hit
            s.wire_saved_bytes += n_hit * (width + 8)
            if n_hit == 0:
                return hit, None
            return hit, self._slab.index_select(0, torch.from_numpy(got).to(self.device))

    def skipped_lookup(self, fingerprint: str) -> None:
        with self._lock:
            v = self._versions.get(fingerprint)
            if v is not None:
                v.stats.lookups_skipped += 1

    # -- admission -----------------------------------------------------------------------

    def admit(self, fingerprint: str, table: str, num_rows: int, rows: Rows, packed: torch.Tensor,
              seq: int) -> int:
        """Offer rows read at `seq` (sorted unique, their bytes `packed` on any device) to
        the cache; the policy decides which stay. Returns how many were stored."""
        with self._lock:
            v = self._versions.get(fingerprint)
            width = int(packed.shape[1]) if packed.dim() == 2 else 0
            if v is None or seq > v.learned or rows.size == 0 or width == 0:
                return 0
            if not self.width:
                self._allocate(width)
            if width != self.width:
                return 0
            t = self._table(v, fingerprint, table, num_rows)
            if not t.touches.fits(seq):
                return 0
            lo, hi = t.touches.interval(rows, seq)
            slots = t.slot_of[rows].astype(np.intp)
            # Already there (another batch's read, or bytes for other seqs): replaced in
            # place, and marked used now so that no victim is picked among them.
            chosen = np.flatnonzero(slots >= 0)
            self._tick += 1
            self._used_at[slots[chosen]] = self._tick
            new = np.flatnonzero(slots < 0)
            placed = self._place(v, t, rows, new)
            where = np.concatenate([slots[chosen], placed[1]]).astype(np.intp)
            take = np.concatenate([chosen, placed[0]]).astype(np.intp)
            if where.size == 0:
                return 0
            t.slot_of[rows[take]] = where.astype(np.int32)
            self._key[where] = t.key
            self._row[where] = rows[take]
            self._lo[where], self._hi[where] = lo[take], hi[take]
            self._used_at[where] = self._tick
            src = packed.index_select(0, torch.from_numpy(take).to(packed.device))
            self._slab.index_copy_(0, torch.from_numpy(where).to(self.device),
                                   src.to(self.device, non_blocking=True))
            return int(where.size)

    def _place(self, v: _Version, t: _Table, rows: Rows, new: npt.NDArray[np.intp]
               ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Slots for some of the new rows: free ones first, then the policy's victims.
        Returns (positions in `rows` admitted, their slots)."""
        free = np.flatnonzero(self._key < 0)[:new.size] if self._free_slots else new[:0]
        if self._sketch is not None and new.size > free.size:
            freq = self._sketch.estimate(t.key, rows[new])
            new = new[np.argsort(-freq.astype(np.int32), kind="stable")]  # hottest get free slots
        into_free = min(new.size, free.size)
        self._free_slots -= into_free
        take, where = [new[:into_free]], [free[:into_free]]
        rest = new[into_free:][: self.slots]
        if rest.size:  # not the rows this call replaces (used at this tick)
            victims = lru_victims(self._used_at, self._key, self._tick, rest.size, self._rng)
            if self._sketch is None:
                n = min(rest.size, victims.size)
                won, lost = rest[:n], victims[:n]
            else:
                c, w = admit_over(self._sketch.estimate(t.key, rows[rest]),
                                  self._victim_freq(victims))
                won, lost = rest[c], victims[w]
            self._evict(lost)
            self._free_slots -= int(lost.size)  # taken again at once, below
            take.append(won)
            where.append(lost)
        return np.concatenate(take), np.concatenate(where)

    def _victim_freq(self, victims: npt.NDArray[np.intp]) -> npt.NDArray[np.uint16]:
        assert self._sketch is not None
        freq = np.zeros(victims.size, np.uint16)
        for k, mine in _by_key(self._key[victims]):
            freq[mine] = self._sketch.estimate(k, self._row[victims[mine]])
        return freq

    def _evict(self, slots: npt.NDArray[np.intp]) -> None:
        for k, mine in _by_key(self._key[slots]):
            self._tables[k][0].stats.evictions += int(mine.sum())
        self._free(slots)

    def _free(self, slots: npt.NDArray[np.intp]) -> int:
        for k, mine in _by_key(self._key[slots]):
            self._tables[k][1].slot_of[self._row[slots[mine]]] = -1
        self._key[slots] = -1
        self._free_slots += int(slots.size)
        return int(slots.size)

    def _allocate(self, width: int) -> None:
        self.width = width
        self.slots = n = max(1, self.capacity_bytes // width)
        self._slab = torch.zeros((n, width), dtype=torch.uint8, device=self.device)
        self._key = np.full(n, -1, np.int64)
        self._row = np.zeros(n, np.int64)
        self._lo = np.zeros(n, np.int64)
        self._hi = np.full(n, OPEN, np.int64)
        self._used_at = np.zeros(n, np.int64)
        self._sketch = FrequencySketch(n) if self.policy == "tinylfu" else None
        self._free_slots = n

    # -- what the admin API and /metrics show -------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Config, occupancy and every open version's counters, entries and bytes."""
        with self._lock:
            per_key = np.bincount(self._key[self._key >= 0], minlength=self._next_key)
            versions = []
            for fp, v in sorted(self._versions.items(), key=lambda kv: kv[1].name):
                entries = int(sum(per_key[t.key] for t in v.tables.values()))
                versions.append({"version": v.name, "fingerprint": fp, "learned_seq": v.learned,
                                 "entries": entries, "bytes": entries * self.width,
                                 **v.stats.as_dict()})
            used = int((self._key >= 0).sum())
            return {"capacity_bytes": self.capacity_bytes, "policy": self.policy,
                    "device": str(self.device), "row_bytes": self.width, "slots": self.slots,
                    "entries": used, "bytes": used * self.width, "versions": versions}


def _by_key(keys: npt.NDArray[np.int64]) -> list[tuple[int, npt.NDArray[np.bool_]]]:
    """Each table key among `keys` with its positions (one key, the usual case, unsorted)."""
    if keys.size == 0:
        return []
    if (keys == keys[0]).all():
        return [(int(keys[0]), np.ones(keys.size, bool))]
    return [(int(k), keys == k) for k in np.unique(keys)]

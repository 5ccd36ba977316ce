"""The delta seqs one loaded version can be read at on this shard, and how one more is made.

Readable states (overlay.OverlayState) are kept in a dict in the order they were made
readable, at most `keep` of them (--readable-seqs): the newest ones, so rankers at s and
s + 1 are both served while the fleet advances. Seq 0 (V's own rows) starts readable.
The dict is never changed in place: publishing a state replaces it, and a lookup holds
the state it found (the registry reads the reference under its lock).

Making seq t readable starts from the highest readable state below t (or V itself) and
verifies every delta after it up to t completely (modelpack.delta_read.read_delta, each
against the previous link of the chain) before anything is built: a DeltaError leaves
every state as it was. A t below every readable state is rebuilt from V and deltas 1..t.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from embedding_server.errors import DELTA_REFUSED, ServiceError
from embedding_server.overlay import OverlayState, advance
from embedding_server.served_table import ServedTable
from modelpack.delta import DeltaError
from modelpack.delta_read import TableDelta, read_delta
from modelpack.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What making `seq` readable takes, verified and merged, not yet indexed."""

    seq: int
    link: str  # delta seq's manifest fingerprint
    tables: dict[str, TableDelta]  # each table's folded rows at seq on this shard
    rows_applied: int  # rows of the deltas read that fall in this shard's range
    base_seq: int  # the state it was built on


class VersionDeltas:
    """Readable states of one loaded version on this shard."""

    def __init__(self, directory: Path, manifest: Manifest, tables: dict[str, ServedTable],
                 keep: int) -> None:
        self.directory, self.manifest, self.tables, self.keep = directory, manifest, tables, keep
        self.readable: dict[int, OverlayState] = {0: OverlayState(0, manifest.fingerprint)}
        self.newest = 0  # the seq most recently made readable
        self.lock = threading.Lock()  # one apply at a time per version

    @property
    def name(self) -> str:
        return f"{self.manifest.model}/{self.manifest.version}"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.readable.values())

    def seqs(self) -> tuple[int, ...]:
        return tuple(sorted(self.readable))

    def check_link(self, seq: int, fingerprint: str, have: str) -> None:
        """A caller's expected fingerprint of delta `seq` against the one read."""
        if fingerprint and fingerprint != have:
            what = f"delta {seq}" if seq else "the version itself (seq 0)"
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{self.name} {what} has fingerprint {have}, the request expects "
                               f"{fingerprint}", DELTA_REFUSED)

    def base_for(self, seq: int) -> OverlayState:
        """The state `seq` is built on: the highest readable one below it, else V itself."""
        below = [s for s in self.readable if s < seq]
        return self.readable[max(below)] if below else OverlayState(0, self.manifest.fingerprint)

    def prepare(self, seq: int, fingerprint: str) -> Prepared:
        """Verify deltas (base, seq] and merge them onto the base state; ServiceError
        delta_refused naming the delta on any fault, with nothing changed."""
        base = self.base_for(seq)
        read: list[dict[str, TableDelta]] = []
        link = base.link
        try:
            for s in range(base.seq + 1, seq + 1):  # every delta read and verified first
                d = read_delta(self.directory, s, base=self.manifest, prev_fingerprint=link)
                link = d.manifest.fingerprint
                read.append(d.tables)
        except DeltaError as e:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"refused: {e}; this shard still reads {self.name} at seqs "
                               f"{list(self.seqs())}", DELTA_REFUSED) from None
        self.check_link(seq, fingerprint, link)
        tables, rows = advance(base, self.tables, read)
        return Prepared(seq, link, tables, rows, base.seq)

    def dropped_by(self, seq: int) -> list[int]:
        """The seqs publishing `seq` would make unreadable (the oldest beyond `keep`)."""
        order = [s for s in self.readable if s != seq] + [seq]
        return order[:max(len(order) - self.keep, 0)]

    def publish(self, state: OverlayState) -> list[int]:
        """Make `state` readable (a new dict, swapped in); returns the seqs dropped."""
        gone = self.dropped_by(state.seq)
        self.readable = {s: v for s, v in self.readable.items() if s not in gone and s != state.seq}
        self.readable[state.seq] = state
        self.newest = state.seq
        return gone

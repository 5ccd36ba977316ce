"""TableSource over the embedding shards, through embedding_server.client (the one door).

One lookup per shard per batch, each table's rows de-duplicated before the wire and
expanded after; the client's errors become RankErrors with the HTTP status an ads
backend can act on. A shard serving another build is a version_mismatch (the alarm),
never a score; a shard that does not hold the version is version_not_loaded (an
ordinary state during a rollout or a restart, not the alarm). Every lookup names the
batch's delta seq; an answer echoing another is the alarm too, and a shard none of whose
replicas can read the seq is seq_not_applied (503: never served from other rows). A
shard of which no replica holds the version READY (the client's routing table,
embedding_server.routing) is no_replica_holds_version: 503 with Retry-After naming the
shard and version, counted in ranker_no_replica_holds_version_total{shard, version}.

The prepare handshake (`prepare`): every replica of every shard answers ListVersions with
the shard index the ranker expects, and no replica holds another build of the version
(a fingerprint mismatch always refuses: the alarm). Then `min_replicas` (per call, else
the ranker's `prepare_min_replicas`): 0 (the default) = every replica holds it READY with
our fingerprint (the in-place rollout: both versions on every replica); n >= 1 = at
least n replicas of each shard do (a blue/green rollout, where a replica holds one
version at a time: 1), and then a replica that does not answer is tolerated as long as
n others do. Lookups go only to the replicas that hold it (routing), so a shard that
passed with n >= 1 is served by those.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt
from prometheus_client import Counter

from embedding_server.client import (
    EmbeddingClient,
    EmbeddingLookupError,
    NoReplicaHoldsVersionError,
    SeqNotAppliedError,
    VersionMismatchError,
    VersionNotLoadedError,
)
from embedding_server.routing import DEFAULT_REFRESH_S
from modelpack.lookup import Packed, TableQuery, unique_rows
from modelpack.manifest import Manifest
from ranker_server.errors import RankError
from ranker_server.sources import PrepareError
from ranker_server.versions import LoadedVersion

if TYPE_CHECKING:
    from protos.embedding_pb2 import VersionInfo
    from ranker_server.metrics import Metrics

log = logging.getLogger(__name__)
_READY = 2  # embedding_pb2.VERSION_STATE_READY, spelled out to keep protos' enum out of types


class RemoteTables:
    """Embedding shards behind embedding_server.client: one lookup per shard per batch."""

    def __init__(self, shards: Sequence[Sequence[str]], prepare_timeout_s: float, *,
                 lookup_token: str | None = None, transport: str = "stream",
                 metrics: Metrics | None = None, prepare_min_replicas: int = 0,
                 routing_refresh_s: float = DEFAULT_REFRESH_S) -> None:
        if prepare_min_replicas < 0:
            raise ValueError(f"prepare_min_replicas must be >= 0, got {prepare_min_replicas}")
        self.client = EmbeddingClient(shards, lookup_token=lookup_token, transport=transport,
                                      on_seq_not_applied=self._seq_not_applied,
                                      routing_refresh_s=routing_refresh_s)
        self.prepare_timeout_s = prepare_timeout_s
        self.prepare_min_replicas = prepare_min_replicas
        self.metrics = metrics
        # Here rather than in ranker_server.metrics: only lookups over remote shards fail so.
        self.no_replica_holds_version = None if metrics is None else Counter(
            "ranker_no_replica_holds_version", "Lookups failed at once because no replica of a "
            "shard holds the version READY (the client's routing table).", ["shard", "version"],
            registry=metrics.registry)

    def _seq_not_applied(self, shard: int) -> None:
        if self.metrics is not None:
            self.metrics.seq_not_applied.labels(str(shard)).inc()

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> list[Packed]:
        m = version.manifest
        seq = version.seq if seq is None else seq
        # Each row once per table (pooled queries keep their bags as they are).
        sent: list[TableQuery] = []
        inverses: list[npt.NDArray[np.intp] | None] = []
        for q in queries:
            if q.pooling == "none":
                unique, inverse = unique_rows(q.rows)
                sent.append(TableQuery(q.table, q.num_rows, q.dim, unique, None, "none", q.output))
                inverses.append(inverse)
            else:
                sent.append(q)
                inverses.append(None)
        if self.metrics is not None:
            self.metrics.lookup_rows_requested.inc(sum(q.rows.size for q in queries))
            self.metrics.lookup_rows_unique.inc(sum(q.rows.size for q in sent))
        try:
            out = await self.client.lookup(m.model, m.version, m.fingerprint, sent,
                                           timeout_s=timeout_s, seq=seq)
        except EmbeddingLookupError as e:
            if isinstance(e, NoReplicaHoldsVersionError) and self.no_replica_holds_version is not None:
                self.no_replica_holds_version.labels(str(e.shard), m.version).inc()
            raise _lookup_error(m, seq, e) from None
        return [np.asarray(a if inv is None else a[inv], dtype=np.uint8)
                for a, inv in zip(out, inverses, strict=True)]

    async def prepare(self, manifest: Manifest, *, min_replicas: int | None = None) -> None:
        """The prepare handshake (the module docstring's rule); `min_replicas` None: the
        ranker's prepare_min_replicas (0: every replica)."""
        want = f"{manifest.model}/{manifest.version}"
        need = self.prepare_min_replicas if min_replicas is None else min_replicas
        answers = await self.client.list_versions(timeout_s=self.prepare_timeout_s)
        shards = len(answers)
        for k, replicas in enumerate(answers):
            holders: list[str] = []
            lacking: list[str] = []  # why each other replica does not count
            for r, resp in enumerate(replicas):
                where = f"shard {k} replica {self.client.replicas[k][r]}"
                if isinstance(resp, grpc.aio.AioRpcError):
                    lacking.append(f"{where} did not answer ListVersions: {resp.code().name}: "
                                   f"{resp.details()}")
                    continue
                if resp.shard != k or resp.num_shards != shards:
                    raise PrepareError(f"{where} says it is shard {resp.shard} of "
                                       f"{resp.num_shards}, the ranker expects shard {k} of "
                                       f"{shards}: check the order of --embedding-shards")
                why = _not_held(where, want, manifest.fingerprint, list(resp.versions))
                if why is None:
                    holders.append(where)
                else:
                    lacking.append(why)
            enough = len(holders) >= min(need, len(replicas)) if need else not lacking
            if not enough:
                tail = "" if not need else (f" ({len(holders)} of shard {k}'s replicas hold it, "
                                            f"{need} needed)")
                raise PrepareError(f"{lacking[0]}{tail}")

    def open_version(self, manifest: Manifest) -> None:
        return None

    def close_version(self, version: str) -> None:
        return None

    def open_seq(self, manifest: Manifest, seq: int) -> None:
        return None  # the shards apply deltas; the controller has them do so first

    async def close(self) -> None:
        await self.client.close()


def _not_held(where: str, want: str, fingerprint: str, held: list[VersionInfo]
              ) -> str | None:
    """None if the replica holds `want` READY with `fingerprint`, else why not; another
    build of it is never just "not held": PrepareError at once (the alarm)."""
    mine = [v for v in held if f"{v.model}/{v.version}" == want]
    if not mine:
        others = ", ".join(f"{v.model}/{v.version}" for v in held) or "none"
        return f"{where} does not hold {want} (it holds: {others})"
    info = mine[0]
    if info.fingerprint and info.fingerprint != fingerprint:
        raise PrepareError(f"{where} serves {want} with fingerprint {info.fingerprint}, the "
                           f"ranker's manifest has {fingerprint}")
    if info.state != _READY:
        return (f"{where} holds {want} in state {info.state} (not READY)"
                + (f": {info.error}" if info.error else ""))
    return None


def _mismatch(m: Manifest, said: str) -> RankError:
    return RankError(503, "version_mismatch",
                     f"version mismatch: request pinned to {m.model}/{m.version} "
                     f"({m.fingerprint}); {said}")


def _lookup_error(m: Manifest, seq: int, e: EmbeddingLookupError) -> RankError:
    if isinstance(e, VersionMismatchError):
        return _mismatch(m, str(e))
    if isinstance(e, NoReplicaHoldsVersionError):
        return RankError(503, "no_replica_holds_version",
                         f"no_replica_holds_version: no replica of shard {e.shard} holds "
                         f"{m.model}/{m.version} READY: {e}", retry_after_s=1)
    if isinstance(e, SeqNotAppliedError):
        return RankError(503, "seq_not_applied",
                         f"seq_not_applied: no replica of shard {e.shard} can read "
                         f"{m.model}/{m.version} at delta seq {seq}: {e}", retry_after_s=1)
    if isinstance(e, VersionNotLoadedError):
        return RankError(503, "version_not_loaded",
                         f"shard {e.shard} does not hold {m.model}/{m.version} ready: {e}",
                         retry_after_s=1)
    code = e.code
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        # A shard that gives no reason (an older build) refused our version or fingerprint:
        # it may serve another build, so this stays the alarm.
        return _mismatch(m, f"shard {e.shard} refused it: {e}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RankError(504, "deadline", f"embedding lookup deadline exceeded: {e}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return RankError(503, "embedding_unavailable", f"embedding shards unavailable: {e}",
                         retry_after_s=1)
    return RankError(502, "embedding_error", f"embedding lookup failed: {e}")

"""Async client of a sharded EmbeddingService: the one door between the tiers.

One logical lookup (several tables, global rows) is split by row range into one lookup
per shard carrying every table, all fired at once; the answers are checked against the
requested model, version and fingerprint and merged back into request order.

Two transports (`transport=`): "stream" (default) keeps one long-lived LookupStream per
shard replica, round-robin over those that are up (embedding_server.client_streams);
"unary" sends one `Lookup` call per shard on a channel whose target gRPC resolves itself
(`dns:///host:port`, or `ipv4:a:p1,b:p2`) and balances with its `round_robin` policy.
Both follow one retry rule (`_call`): UNAVAILABLE from a draining replica is retried on
another until the deadline, an unreachable one a few times within a short budget, so a
shard whose every replica refuses fails the lookup in milliseconds.

A lookup names a delta seq (LookupRequest.seq: the version's rows with deltas 1..seq
applied) and every answer must echo it, as it echoes the fingerprint. A replica that
cannot read that seq (`seq_not_applied`: not applied yet, or no longer readable) or does
not hold the version (`version_not_loaded`: a blue/green step unloading it) is a state of
that replica, not of the shard: the lookup moves to a sibling that has not refused it
(streams skip the refusing slot; unary calls the next replica on its own channel where
the addresses are fixed, else trusts round_robin's next pick), and fails
SeqNotAppliedError / VersionNotLoadedError only when no replica can.

Version-aware routing (embedding_server.routing, the contract): where a shard is given
as fixed replica addresses, a table of what each replica holds READY (refreshed every
`routing_refresh_s`) sends a lookup only to the replicas that can answer it, balanced
among them, and fails it at once when none can (NoReplicaHoldsVersionError). While every
replica qualifies, both transports behave exactly as without the table. Depends on
protos and modelpack only (no FBGEMM, no server code).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from embedding_server.routing import DEFAULT_REFRESH_S, RoutingTable
from embedding_server.routing_calls import (
    RETRY_ATTEMPTS,
    RETRY_BUDGET_S,
    EmbeddingLookupError,
    NoReplicaHoldsVersionError,
    SeqNotAppliedError,
    ShardCalls,
    VersionMismatchError,
    VersionNotLoadedError,
    replicas_target,
)
from modelpack.hashing import shard_bounds
from modelpack.lookup import TableQuery, split_rows
from protos import embedding_pb2 as pb

# The client's errors and retry bounds live with the call; every caller imports them here.
__all__ = ["RETRY_ATTEMPTS", "RETRY_BUDGET_S", "EmbeddingClient", "EmbeddingLookupError",
           "NoReplicaHoldsVersionError", "SeqNotAppliedError", "ShardPart",
           "VersionMismatchError", "VersionNotLoadedError", "replicas_target", "split_query"]

POOLING = {"none": pb.POOLING_NONE, "sum": pb.POOLING_SUM, "mean": pb.POOLING_MEAN}
OUTPUT = {"int4": pb.OUTPUT_INT4_PACKED, "fp16": pb.OUTPUT_FP16, "fp32": pb.OUTPUT_FP32}
TRANSPORTS = ("stream", "unary")


@dataclass
class ShardPart:
    """What one shard must answer for one table, and where its answer goes."""

    positions: npt.NDArray[np.int64] | slice  # for unpooled: output rows this shard fills
    request: pb.TableLookup


def _ascending(rows: npt.NDArray[np.int64]) -> bool:
    return rows.size < 2 or bool((rows[1:] > rows[:-1]).all())


def split_query(q: TableQuery, num_shards: int) -> list[ShardPart]:
    """What each of `num_shards` shards must answer for `q`, and where its answer goes."""
    bounds = shard_bounds(q.num_rows, num_shards)
    pooled = q.pooling != "none"
    by_shard: list[npt.NDArray[np.int64]] | list[slice]
    if not pooled and _ascending(q.rows):
        # De-duplicated rows (modelpack.lookup.unique_rows) are ascending: each shard's
        # part is one slice, cut with one searchsorted instead of a scan per shard.
        cuts = np.searchsorted(q.rows, bounds).tolist()
        cuts[0], cuts[-1] = 0, q.rows.size  # out-of-range rows: the edge shards refuse them
        by_shard = [slice(a, b) for a, b in itertools.pairwise(cuts)]
    else:
        by_shard = split_rows(q.rows, bounds)
    if pooled:
        assert q.offsets is not None
        bag = np.searchsorted(q.offsets, np.arange(q.rows.size), side="right") - 1
        num_bags = q.offsets.size - 1
    parts = []
    for idx in by_shard:
        req = pb.TableLookup(table=q.table, rows=q.rows[idx].astype("<i8", copy=False).tobytes())
        if pooled:
            per_bag = np.bincount(bag[idx], minlength=num_bags)
            offs = np.zeros(num_bags + 1, dtype="<i8")
            np.cumsum(per_bag, out=offs[1:])
            req.offsets = offs.tobytes()
            # Bags span shards: shards return FP32 partial sums; the mean is taken here.
            req.pooling = pb.POOLING_SUM
            req.output = pb.OUTPUT_FP32
        else:
            req.pooling = pb.POOLING_NONE
            req.output = OUTPUT[q.output]
        parts.append(ShardPart(idx, req))
    return parts


class EmbeddingClient:
    """Fans lookups out to `shards` (each a list of replica addresses or one dns:/// target)."""

    def __init__(self, shards: Sequence[Sequence[str]], *, default_timeout_s: float = 1.0,
                 lookup_token: str | None = None, transport: str = "stream",
                 on_seq_not_applied: Callable[[int], None] | None = None,
                 routing_refresh_s: float = DEFAULT_REFRESH_S) -> None:
        if not shards:
            raise ValueError("need at least one embedding shard")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.targets = [replicas_target(s) for s in shards]
        self.replicas = [list(s) for s in shards]
        self.default_timeout_s = default_timeout_s
        self.transport = transport
        # Sent with every Lookup, for shards started with --lookup-token-file.
        metadata = (("authorization", f"Bearer {lookup_token}"),) if lookup_token else None
        self._calls = ShardCalls(shards, transport=transport, metadata=metadata,
                                 on_seq_not_applied=on_seq_not_applied,
                                 routing_refresh_s=routing_refresh_s)

    @property
    def routing(self) -> RoutingTable | None:
        """Who holds what READY (None: routing off, routing_refresh_s 0)."""
        return self._calls.routing

    @property
    def on_seq_not_applied(self) -> Callable[[int], None] | None:
        """Called with the shard index on every replica's seq_not_applied."""
        return self._calls.on_seq_not_applied

    async def close(self) -> None:
        await self._calls.close()

    @property
    def num_shards(self) -> int:
        return len(self.targets)

    async def lookup(self, model: str, version: str, fingerprint: str,
                     queries: Sequence[TableQuery], timeout_s: float | None = None, *,
                     seq: int = 0) -> list[npt.NDArray[np.generic]]:
        """Look up every query at once, read at delta `seq`; one array per query, in
        request order.

        Unpooled: uint8 (rows, 4 + dim/2) for int4, else (rows, dim) fp16/fp32.
        Pooled: (bags, dim) in the requested float type.
        """
        budget = timeout_s if timeout_s is not None else self.default_timeout_s
        deadline = time.monotonic() + budget
        if self._calls.routing is not None:
            self._calls.routing.start()
        want = (model, version, fingerprint, seq)
        split = [split_query(q, self.num_shards) for q in queries]
        requests = [
            pb.LookupRequest(model=model, version=version, fingerprint=fingerprint, seq=seq,
                             tables=[parts[k].request for parts in split])
            for k in range(self.num_shards)
        ]
        answers = await asyncio.gather(
            *(self._calls.call(k, r, deadline, want) for k, r in enumerate(requests)))
        # Without a fingerprint to check, the shards must at least agree with each other:
        # two builds published under one version name must never be merged into one answer.
        expected = fingerprint or (answers[0].fingerprint if answers else "")
        for k, a in enumerate(answers):
            if a.model != model or a.version != version or a.fingerprint != expected:
                raise VersionMismatchError(
                    f"shard {k} answered {a.model}/{a.version} ({a.fingerprint[:19]}) for a lookup "
                    f"of {model}/{version} ({expected[:19]}"
                    f"{'' if fingerprint else ', as shard 0 answered'})", None, k)
            if a.seq != seq:  # rows of another delta seq: never merged, never scored
                raise VersionMismatchError(
                    f"shard {k} answered {model}/{version} read at delta seq {a.seq} for a "
                    f"lookup at seq {seq}", None, k)
            if a.shard != k or a.num_shards != self.num_shards or len(a.results) != len(queries):
                raise EmbeddingLookupError(
                    f"shard {k} answered as shard {a.shard}/{a.num_shards} with "
                    f"{len(a.results)} results (expected shard {k}/{self.num_shards}, "
                    f"{len(queries)} results): misconfigured shard order?", None, k)
        return [self._merge(q, split[i], [a.results[i] for a in answers])
                for i, q in enumerate(queries)]

    @staticmethod
    def _merge(q: TableQuery, parts: list[ShardPart], results: Sequence[pb.TableResult]
               ) -> npt.NDArray[np.generic]:
        if q.pooling != "none":
            assert q.offsets is not None
            out = np.zeros((q.offsets.size - 1, q.dim), dtype=np.float32)
            for r in results:
                out += np.frombuffer(r.data, dtype="<f4").reshape(-1, q.dim)
            if q.pooling == "mean":
                out /= np.maximum(np.diff(q.offsets), 1)[:, None].astype(np.float32)
            return out.astype(np.float16) if q.output == "fp16" else out
        dtype: np.dtype[np.generic]
        if q.output == "int4":
            width, dtype = 4 + q.dim // 2, np.dtype(np.uint8)
        else:
            width, dtype = q.dim, np.dtype("<f2" if q.output == "fp16" else "<f4")
        merged = np.empty((q.rows.size, width), dtype=dtype)
        for p, r in zip(parts, results, strict=True):
            data = np.frombuffer(r.data, dtype=dtype)
            pos = p.positions
            n = pos.stop - pos.start if isinstance(pos, slice) else pos.size
            if data.size != n * width:
                raise EmbeddingLookupError(f"table {q.table}: shard answered {data.size} values, "
                                           f"expected {n * width}")
            merged[pos] = data.reshape(-1, width)
        return merged

    async def list_versions(self, timeout_s: float = 2.0
                            ) -> list[list[pb.ListVersionsResponse | grpc.aio.AioRpcError]]:
        """ListVersions from every replica of every shard (the prepare handshake asks all),
        each answer or the replica's error; every answer also feeds the routing table."""
        return await self._calls.list_versions(timeout_s)

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
cannot read that seq (`seq_not_applied`: not applied yet, or no longer readable) is a
state of that replica, not of the shard: the lookup moves to a sibling that has not
refused it (streams skip the refusing slot; unary trusts round_robin's next pick), and
fails SeqNotAppliedError only when no replica can. Depends on protos and modelpack only
(no FBGEMM, no server code).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt

from embedding_server.client_streams import AttemptFailed, ShardStreams, reason_of
from modelpack.hashing import shard_bounds
from modelpack.lookup import (
    FINGERPRINT_MISMATCH,
    SEQ_NOT_APPLIED,
    VERSION_NOT_LOADED,
    TableQuery,
    split_rows,
)
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pb_grpc

_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "hybrid.embedding.v1.EmbeddingService"}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.005s", "maxBackoff": "0.05s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
})
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    # A restarted replica comes back on its old address: reconnect within a second, not
    # after gRPC's default backoff (up to 120 s), so the fleet heals in seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_UNARY_OPTIONS = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1),
                  *_CHANNEL_OPTIONS]
# Streams retry in our own code (one rule for both transports), and gRPC's retry layer costs
# every message on a stream a buffered copy and a filter pass: off.
_STREAM_OPTIONS = [("grpc.enable_retries", 0), *_CHANNEL_OPTIONS]
# UNAVAILABLE is retried this many times, and only this long after the first attempt: a
# SIGTERM-drained or killed replica's lookups move to a sibling within a few ms, while a
# shard with no live replica (every port refuses at once) fails fast instead of at the
# deadline, so the ranker answers 503 with Retry-After rather than 504 a second later.
RETRY_ATTEMPTS = 5
RETRY_BUDGET_S = 0.1
POOLING = {"none": pb.POOLING_NONE, "sum": pb.POOLING_SUM, "mean": pb.POOLING_MEAN}
OUTPUT = {"int4": pb.OUTPUT_INT4_PACKED, "fp16": pb.OUTPUT_FP16, "fp32": pb.OUTPUT_FP32}
TRANSPORTS = ("stream", "unary")


class EmbeddingLookupError(Exception):
    """A lookup that failed; `code` is the gRPC status of the failing shard, if any, and
    `reason` the shard's machine-readable reason (protos/embedding.proto), if it gave one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, shard: int = -1,
                 reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.shard = shard
        self.reason = reason


class VersionMismatchError(EmbeddingLookupError):
    """A shard answered with, or holds, another model version or fingerprint than requested."""


class VersionNotLoadedError(EmbeddingLookupError):
    """A shard does not hold the requested version READY (not loaded yet, or unloading)."""


class SeqNotAppliedError(EmbeddingLookupError):
    """No replica of a shard can read the version at the requested delta seq."""


def replicas_target(addresses: Sequence[str]) -> str:
    """A gRPC target for a shard: one `dns:///...` target as is, or fixed `host:port` replicas."""
    if len(addresses) == 1 and ":///" in addresses[0]:
        return addresses[0]
    if any(":///" in a for a in addresses):
        raise ValueError(f"mix of resolver targets and addresses for one shard: {list(addresses)}")
    return "ipv4:" + ",".join(addresses)


@dataclass
class ShardPart:
    """What one shard must answer for one table, and where its answer goes."""

    positions: npt.NDArray[np.int64] | slice  # for unpooled: output rows this shard fills
    request: pb.TableLookup


def _ascending(rows: npt.NDArray[np.int64]) -> bool:
    return rows.size < 2 or bool((rows[1:] > rows[:-1]).all())


def _error(k: int, e: AttemptFailed, tried: str) -> EmbeddingLookupError:
    """The client's exception for shard k's failure: its reason picks the class."""
    cls = {VERSION_NOT_LOADED: VersionNotLoadedError, FINGERPRINT_MISMATCH: VersionMismatchError,
           SEQ_NOT_APPLIED: SeqNotAppliedError}.get(e.reason, EmbeddingLookupError)
    return cls(f"shard {k}: {e.code.name}: {e.message}{tried}", e.code, k, e.reason)


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
                 on_seq_not_applied: Callable[[int], None] | None = None) -> None:
        if not shards:
            raise ValueError("need at least one embedding shard")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.targets = [replicas_target(s) for s in shards]
        self.replicas = [list(s) for s in shards]
        self.default_timeout_s = default_timeout_s
        # Sent with every Lookup, for shards started with --lookup-token-file.
        self._metadata = (("authorization", f"Bearer {lookup_token}"),) if lookup_token else None
        self.transport = transport
        # Called with the shard index on every replica's seq_not_applied (failed over or not).
        self.on_seq_not_applied = on_seq_not_applied
        self._streams = [ShardStreams(r, _STREAM_OPTIONS, self._metadata)
                         for r in self.replicas] if transport == "stream" else []
        self._channels = [grpc.aio.insecure_channel(t, options=_UNARY_OPTIONS)
                          for t in self.targets] if transport == "unary" else []
        self._stubs = [
            pb_grpc.EmbeddingServiceStub(c)  # type: ignore[no-untyped-call]
            for c in self._channels
        ]

    @property
    def num_shards(self) -> int:
        return len(self.targets)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams),
                             *(c.close() for c in self._channels))

    def _tries_for_seq(self, k: int) -> int:
        """How many replicas of shard k a seq_not_applied lookup may be tried on."""
        if self._streams:
            return self._streams[k].size  # each slot once: the refusing ones are skipped
        # Unary cannot pick the replica; round_robin moves on at each call, but only over
        # connected ones: twice the replicas (a dns:/// target: at least one sibling).
        return 2 * max(len(self.replicas[k]), 2)

    async def _attempt(self, k: int, request: pb.LookupRequest, timeout_s: float,
                       avoid: set[int]) -> pb.LookupResponse:
        """One try at shard k, on the next replica not in `avoid`; AttemptFailed if it did
        not answer rows."""
        # The shard gives up on it at our deadline too, rather than gather rows nobody reads.
        request.timeout_s = timeout_s
        if self._streams:
            return await self._streams[k].lookup(request, timeout_s, avoid)
        try:
            resp: pb.LookupResponse = await self._stubs[k].Lookup(
                request, timeout=timeout_s, metadata=self._metadata)
            return resp
        except grpc.aio.AioRpcError as e:
            raise AttemptFailed(e.code(), reason_of(e.trailing_metadata()),
                                e.details() or "") from None

    async def _call(self, k: int, request: pb.LookupRequest, deadline: float) -> pb.LookupResponse:
        first_failure = 0.0
        attempt = 0
        refused: set[int] = set()  # stream slots that cannot read the seq
        seq_refusals: list[AttemptFailed] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EmbeddingLookupError(f"shard {k}: deadline exceeded",
                                           grpc.StatusCode.DEADLINE_EXCEEDED, k)
            try:
                return await self._attempt(k, request, remaining, refused)
            except AttemptFailed as e:
                attempt += 1
                now = time.monotonic()
                first_failure = first_failure or now
                if e.reason == SEQ_NOT_APPLIED:
                    # That replica's state, not the shard's: a sibling may read the seq.
                    seq_refusals.append(e)
                    refused.add(e.replica)
                    if self.on_seq_not_applied is not None:
                        self.on_seq_not_applied(k)
                    if len(seq_refusals) < self._tries_for_seq(k):
                        if not self._streams:  # let round_robin connect the others
                            await asyncio.sleep(min(0.005 * len(seq_refusals), 0.02))
                        continue
                elif seq_refusals and e.code == grpc.StatusCode.UNAVAILABLE:
                    # The replicas that did not refuse it are down: the shard cannot read it.
                    e = AttemptFailed(seq_refusals[-1].code, SEQ_NOT_APPLIED,
                                      f"{seq_refusals[-1].message}; the other replicas: "
                                      f"{e.message}")
                # UNAVAILABLE: the replica is down or draining; the next try goes to the next
                # replica. A draining replica answered, so a sibling may well be up: retry until
                # the deadline. One that cannot be reached gets a few quick tries, so a shard
                # with no live replica fails in milliseconds instead of at the deadline.
                # The budget counts from the first failure: a lookup that waited long on a
                # replica that then died (a stream reset mid-flight) still gets its quick tries.
                if e.code == grpc.StatusCode.UNAVAILABLE and now < deadline and (
                        e.draining or (attempt < RETRY_ATTEMPTS
                                       and now - first_failure < RETRY_BUDGET_S)):
                    await asyncio.sleep(min(0.005 * (attempt - 1), 0.02))
                    continue
                tried = (f" (after {attempt} attempts in {(now - first_failure) * 1000:.0f} ms)"
                         if attempt > 1 else "")
                raise _error(k, e, tried) from None

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
        split = [split_query(q, self.num_shards) for q in queries]
        requests = [
            pb.LookupRequest(model=model, version=version, fingerprint=fingerprint, seq=seq,
                             tables=[parts[k].request for parts in split])
            for k in range(self.num_shards)
        ]
        answers = await asyncio.gather(
            *(self._call(k, r, deadline) for k, r in enumerate(requests)))
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

    async def list_versions(self, timeout_s: float = 2.0) -> list[list[pb.ListVersionsResponse]]:
        """ListVersions from every replica of every shard (the prepare handshake asks all)."""

        async def one(addr: str) -> pb.ListVersionsResponse:
            target = addr if ":///" in addr else "ipv4:" + addr
            async with grpc.aio.insecure_channel(target) as ch:
                resp: pb.ListVersionsResponse = await pb_grpc.EmbeddingServiceStub(ch).ListVersions(  # type: ignore[no-untyped-call]
                    pb.ListVersionsRequest(), timeout=timeout_s)
                return resp

        return [list(await asyncio.gather(*(one(a) for a in reps))) for reps in self.replicas]

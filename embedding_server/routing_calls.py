"""One shard's call for the embedding client: which replica, failover, retries.

`ShardCalls` owns the client's connections to every replica (embedding_server.client
keeps the fan-out, the answers' checks and the merge) and the one retry rule of both
transports (`call`): UNAVAILABLE from a draining replica is retried on another until the
deadline, an unreachable one a few times within a short budget, so a shard whose every
replica refuses fails the lookup in milliseconds. A replica's version_not_loaded or
seq_not_applied moves the lookup to a sibling that has not refused it. Where the shard
is given as fixed replica addresses, the routing table (embedding_server.routing, the
contract) narrows the replicas first, and an empty choice fails at once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence

import grpc

from embedding_server.client_streams import AttemptFailed, ShardStreams, reason_of
from embedding_server.routing import (
    DEFAULT_REFRESH_S,
    EVERY_REPLICA,
    NO_REPLICA_HOLDS_VERSION,
    Choice,
    RoutingTable,
    Want,
)
from modelpack.lookup import FINGERPRINT_MISMATCH, SEQ_NOT_APPLIED, VERSION_NOT_LOADED
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


class NoReplicaHoldsVersionError(VersionNotLoadedError):
    """The routing table says no replica of a shard holds the version READY: failed at
    once, without asking (reason no_replica_holds_version)."""


def replicas_target(addresses: Sequence[str]) -> str:
    """A gRPC target for a shard: one `dns:///...` target as is, or fixed `host:port` replicas."""
    if len(addresses) == 1 and ":///" in addresses[0]:
        return addresses[0]
    if any(":///" in a for a in addresses):
        raise ValueError(f"mix of resolver targets and addresses for one shard: {list(addresses)}")
    return "ipv4:" + ",".join(addresses)


def _no_choice(k: int, request: pb.LookupRequest, choice: Choice, held: str
               ) -> EmbeddingLookupError:
    """Shard k's lookup has no replica to go to: why, as the client's exception."""
    want, fc = f"{request.model}/{request.version}", grpc.StatusCode.FAILED_PRECONDITION
    if choice.holders:
        return SeqNotAppliedError(f"shard {k}: no replica can read {want} at delta seq "
                                  f"{request.seq} ({held})", fc, k, SEQ_NOT_APPLIED)
    if choice.other_builds:
        return VersionMismatchError(
            f"shard {k}: no replica holds {want} with fingerprint {request.fingerprint}; "
            f"another build: {', '.join(choice.other_builds)}", fc, k, FINGERPRINT_MISMATCH)
    return NoReplicaHoldsVersionError(f"shard {k}: no replica holds {want} READY ({held})",
                                      fc, k, NO_REPLICA_HOLDS_VERSION)


def _error(k: int, e: AttemptFailed, tried: str) -> EmbeddingLookupError:
    """The client's exception for shard k's failure: its reason picks the class."""
    cls = {VERSION_NOT_LOADED: VersionNotLoadedError, FINGERPRINT_MISMATCH: VersionMismatchError,
           SEQ_NOT_APPLIED: SeqNotAppliedError}.get(e.reason, EmbeddingLookupError)
    return cls(f"shard {k}: {e.code.name}: {e.message}{tried}", e.code, k, e.reason)


class ShardCalls:
    """Connections to every replica of every shard, and one lookup's call to one shard."""

    def __init__(self, shards: Sequence[Sequence[str]], *, transport: str,
                 metadata: tuple[tuple[str, str], ...] | None,
                 on_seq_not_applied: Callable[[int], None] | None = None,
                 routing_refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.targets = [replicas_target(s) for s in shards]
        self.replicas = [list(s) for s in shards]
        self._metadata = metadata
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
        # Unary, fixed addresses: a channel per replica, opened when a lookup must pick one.
        self._replica_stubs: dict[tuple[int, int], pb_grpc.EmbeddingServiceStub] = {}
        self._replica_channels: list[grpc.aio.Channel] = []
        self._turn = itertools.count()
        # routing_refresh_s 0: no table; every replica may be asked for every version.
        self.routing = RoutingTable(self.replicas, self._list_versions_of, routing_refresh_s
                                    ) if routing_refresh_s > 0 else None

    async def close(self) -> None:
        if self.routing is not None:
            await self.routing.close()
        await asyncio.gather(*(s.close() for s in self._streams),
                             *(c.close() for c in (*self._channels, *self._replica_channels)))

    def _routed(self, k: int) -> bool:
        return self.routing is not None and self.routing.routed(k)

    def _replica_stub(self, k: int, r: int) -> pb_grpc.EmbeddingServiceStub:
        """Unary: a stub on replica r of shard k alone (a shard of fixed addresses)."""
        stub = self._replica_stubs.get((k, r))
        if stub is None:
            ch = grpc.aio.insecure_channel("ipv4:" + self.replicas[k][r], options=_UNARY_OPTIONS)
            self._replica_channels.append(ch)
            stub = self._replica_stubs[k, r] = pb_grpc.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        return stub

    def _may_try_another(self, k: int, allowed: frozenset[int] | None, refused: set[int],
                         refusals: int) -> bool:
        """After a replica refused (seq_not_applied, version_not_loaded): is there another?"""
        if self._streams or self._routed(k):
            n = self._streams[k].size if self._streams else len(self.replicas[k])
            return any(r not in refused for r in (range(n) if allowed is None else allowed))
        # Unary over one round_robin channel cannot pick the replica; it moves on at each
        # call, but only over connected ones: twice the replicas (dns:///: at least one
        # sibling).
        return refusals < 2 * max(len(self.replicas[k]), 2)

    async def _attempt(self, k: int, request: pb.LookupRequest, timeout_s: float,
                       allowed: frozenset[int] | None, refused: set[int]) -> pb.LookupResponse:
        """One try at shard k, on the next replica in `allowed` (None: any) not `refused`;
        AttemptFailed if it did not answer rows."""
        # The shard gives up on it at our deadline too, rather than gather rows nobody reads.
        request.timeout_s = timeout_s
        if self._streams:
            avoid = refused if allowed is None else refused | (
                set(range(self._streams[k].size)) - allowed)
            return await self._streams[k].lookup(request, timeout_s, avoid)
        stub, replica = self._stubs[k], -1
        if self._routed(k) and (allowed is not None or refused):
            left = sorted((set(range(len(self.replicas[k]))) if allowed is None else allowed)
                          - refused)
            replica = left[next(self._turn) % len(left)]
            stub = self._replica_stub(k, replica)
        try:
            resp: pb.LookupResponse = await stub.Lookup(
                request, timeout=timeout_s, metadata=self._metadata)
            return resp
        except grpc.aio.AioRpcError as e:
            raise AttemptFailed(e.code(), reason_of(e.trailing_metadata()),
                                e.details() or "", replica) from None

    async def _choose(self, k: int, request: pb.LookupRequest, want: Want, deadline: float
                      ) -> Choice:
        """The replicas of shard k that may answer `request`; raises when none can."""
        assert self.routing is not None
        # Never fail on a stale word: a version loaded or a seq applied a moment ago.
        await self.routing.ensure_fresh(deadline - time.monotonic())
        choice = self.routing.choose(k, want)
        if choice.replicas is None or choice.replicas:
            return choice
        raise _no_choice(k, request, choice, self.routing.describe(k, request.model))

    async def call(self, k: int, request: pb.LookupRequest, deadline: float, want: Want
                   ) -> pb.LookupResponse:
        """Shard k's answer to `request` (asking `want`) by `deadline` (monotonic), or its
        exception."""
        choice = EVERY_REPLICA if self.routing is None else self.routing.choose(k, want)
        if choice.replicas is not None and not choice.replicas:
            choice = await self._choose(k, request, want, deadline)
        allowed = choice.replicas
        first_failure = 0.0
        attempt = 0
        refused: set[int] = set()  # replicas (stream slots) that refused it
        refusals: list[AttemptFailed] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EmbeddingLookupError(f"shard {k}: deadline exceeded",
                                           grpc.StatusCode.DEADLINE_EXCEEDED, k)
            try:
                return await self._attempt(k, request, remaining, allowed, refused)
            except AttemptFailed as e:
                attempt += 1
                now = time.monotonic()
                first_failure = first_failure or now
                if e.reason in (SEQ_NOT_APPLIED, VERSION_NOT_LOADED):
                    # That replica's state, not the shard's: a sibling may answer it.
                    refusals.append(e)
                    refused.add(e.replica)
                    if e.reason == SEQ_NOT_APPLIED and self.on_seq_not_applied is not None:
                        self.on_seq_not_applied(k)
                    if self.routing is not None:
                        self.routing.refresh_soon()  # the table said it could
                    if self._may_try_another(k, allowed, refused, len(refusals)):
                        if not self._streams and not self._routed(k):
                            # let round_robin connect the others
                            await asyncio.sleep(min(0.005 * len(refusals), 0.02))
                        continue
                elif refusals and e.code == grpc.StatusCode.UNAVAILABLE:
                    # The replicas that did not refuse it are down: the shard cannot answer.
                    last = refusals[-1]
                    e = AttemptFailed(last.code, last.reason,
                                      f"{last.message}; the other replicas: {e.message}")
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

    async def _list_versions_of(self, k: int, r: int, timeout_s: float
                                ) -> pb.ListVersionsResponse:
        """ListVersions of replica r of shard k (the routing table's refresh, prepare)."""
        if self._routed(k):  # on the replica's own connection
            stub = pb_grpc.EmbeddingServiceStub(  # type: ignore[no-untyped-call]
                self._streams[k].channel(r)) if self._streams else self._replica_stub(k, r)
            return await _list_versions(stub, timeout_s)
        addr = self.replicas[k][r]
        async with grpc.aio.insecure_channel(addr if ":///" in addr else "ipv4:" + addr) as ch:
            return await _list_versions(
                pb_grpc.EmbeddingServiceStub(ch), timeout_s)  # type: ignore[no-untyped-call]

    async def list_versions(self, timeout_s: float = 2.0
                            ) -> list[list[pb.ListVersionsResponse | grpc.aio.AioRpcError]]:
        """ListVersions from every replica of every shard (the prepare handshake asks all),
        each answer or the replica's error; every answer also feeds the routing table."""

        async def one(k: int, r: int) -> pb.ListVersionsResponse | grpc.aio.AioRpcError:
            try:
                resp = await self._list_versions_of(k, r, timeout_s)
            except grpc.aio.AioRpcError as e:
                return e
            if self.routing is not None:
                self.routing.record(k, r, resp)
            return resp

        return [list(await asyncio.gather(*(one(k, r) for r in range(len(reps)))))
                for k, reps in enumerate(self.replicas)]


async def _list_versions(stub: pb_grpc.EmbeddingServiceStub, timeout_s: float
                         ) -> pb.ListVersionsResponse:
    resp: pb.ListVersionsResponse = await stub.ListVersions(pb.ListVersionsRequest(),
                                                            timeout=timeout_s)
    return resp

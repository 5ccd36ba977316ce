"""Version-aware routing: which replicas of a shard may answer a lookup for (V, seq).

During a blue/green rollout (issue 14) the replicas of one shard hold different versions:
some still only the old one, some only the new one, some neither while they convert. The
client (embedding_server.client) must send a lookup for version V at delta seq s only to
replicas that can answer it, and say at once when none can.

The contract:

- **What a replica advertises.** `ListVersions` (no token) lists, per version, its state,
  fingerprint and `readable_seqs`. This table keeps, per replica, the (model, version) ->
  (fingerprint, readable seqs) it holds READY (`Held`); other states are not held.
- **Refresh.** Every `refresh_s` (the client's `routing_refresh_s`, default 1 s; 0 turns
  routing off) the table asks every routable replica at once; also at once, at most every
  MIN_REFRESH_INTERVAL_S, after a replica refuses a lookup with version_not_loaded or
  seq_not_applied (`refresh_soon`), and before a lookup that finds no holder is failed
  (`ensure_fresh`: a version loaded or a seq applied a moment ago is seen, never refused
  from a stale table). Every ListVersions the client makes (the ranker's prepare
  handshake) is recorded too. A replica that does not answer keeps what it last said (a
  dead one is failed over by UNAVAILABLE, as before); one never heard from is unknown and
  may be asked anything.
- **Choice** (`choose`): the replicas of shard k that hold V READY with the expected
  fingerprint (any fingerprint when the lookup names none) and list s among their readable
  seqs, plus the unknown ones; the client balances among them (round-robin) and fails a
  refusal over to another of them. `None` means every replica qualifies: the client then
  behaves exactly as without routing (the common case, every replica holds every version).
  An empty choice is a fast, distinct failure, never a wait for the deadline: replicas
  hold V but none reads s -> seq_not_applied; some hold another build of V ->
  fingerprint_mismatch (the alarm); none holds V -> `no_replica_holds_version`
  (NO_REPLICA_HOLDS_VERSION; the client's NoReplicaHoldsVersionError, the ranker's 503
  with Retry-After naming shard and version, ranker_no_replica_holds_version_total).
  Replicas holding another build are routed around while a sibling holds ours; the
  ranker's prepare handshake and readiness check still refuse them (the alarm stays).
- **Which shards are routed.** A shard given as two or more fixed `host:port` replica
  addresses: the client then has one connection per replica and knows which replica each
  lookup goes to. The stream transport (default) routes over its per-replica streams; the
  unary transport keeps gRPC's round_robin channel over the shard while every replica
  qualifies and otherwise calls the chosen replica on a channel of its own. A shard given
  as one `dns:///` target is not routed (gRPC picks the replica; a lookup refused with
  version_not_loaded or seq_not_applied is still retried on another stream or call), so a
  blue/green rollout needs per-replica addresses. A shard with one replica has nothing to
  choose: its refusals stay what the replica said (version_not_loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from protos import embedding_pb2 as pb

log = logging.getLogger(__name__)

NO_REPLICA_HOLDS_VERSION = "no_replica_holds_version"
DEFAULT_REFRESH_S = 1.0
# Refusal-triggered and lookup-awaited refreshes at most this often: a burst of lookups for
# a version nobody holds costs one ListVersions round, not one per lookup.
MIN_REFRESH_INTERVAL_S = 0.05
REFRESH_TIMEOUT_S = 1.0

Key = tuple[str, str]  # (model, version)
Want = tuple[str, str, str, int]  # what a lookup asks: (model, version, fingerprint, seq)
# ListVersions of replica r of shard k, with a timeout in seconds.
Fetch = Callable[[int, int, float], Awaitable[pb.ListVersionsResponse]]


@dataclass(frozen=True)
class Held:
    """A version a replica holds READY: its fingerprint and the delta seqs it can read."""

    fingerprint: str
    seqs: frozenset[int]  # empty: the replica did not say; any seq may be asked

    def reads(self, seq: int) -> bool:
        return not self.seqs or seq in self.seqs


def ready_versions(resp: pb.ListVersionsResponse) -> dict[Key, Held]:
    """What one ListVersions answer says the replica holds READY."""
    return {(v.model, v.version): Held(v.fingerprint, frozenset(v.readable_seqs))
            for v in resp.versions if v.state == pb.VERSION_STATE_READY}


@dataclass(frozen=True)
class Choice:
    """Where shard k's lookup for (V, fingerprint, seq) may go."""

    replicas: frozenset[int] | None  # None: every replica (route as without a table)
    holders: int = 0  # replicas known to hold V READY with the fingerprint, at any seq
    other_builds: tuple[str, ...] = ()  # "address (fingerprint)" of replicas holding another


EVERY_REPLICA = Choice(None)


class RoutingTable:
    """Who holds what READY, per replica of every routed shard, and the refresh loop."""

    def __init__(self, shards: Sequence[Sequence[str]], fetch: Fetch,
                 refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.addresses = [list(s) for s in shards]
        self._routed = [len(s) >= 2 and not any(":///" in a for a in s) for s in shards]
        self._fetch = fetch
        self.refresh_s = refresh_s
        # None: never heard from (may be asked anything).
        self.held: list[list[dict[Key, Held] | None]] = [[None] * len(s) for s in shards]
        self._cache: list[dict[Want, Choice]] = [{} for _ in shards]
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0  # monotonic start of the last refresh round
        self._loop_task: asyncio.Task[None] | None = None

    def routed(self, k: int) -> bool:
        return self._routed[k]

    def record(self, k: int, r: int, resp: pb.ListVersionsResponse) -> None:
        """Replica r of shard k answered ListVersions with `resp`."""
        if not self._routed[k]:
            return
        held = ready_versions(resp)
        if held != self.held[k][r]:
            self.held[k][r] = held
            self._cache[k].clear()

    def choose(self, k: int, want: Want) -> Choice:
        """The replicas of shard k a lookup for `want` may use (cached until an answer
        changes: the common case costs one dict lookup per shard)."""
        if not self._routed[k]:
            return EVERY_REPLICA
        choice = self._cache[k].get(want)
        if choice is None:
            model, version, fingerprint, seq = want
            choice = self._cache[k][want] = self._choose(k, (model, version), fingerprint, seq)
        return choice

    def _choose(self, k: int, key: Key, fingerprint: str, seq: int) -> Choice:
        ok: set[int] = set()
        holders = 0
        others: list[str] = []
        for r, held in enumerate(self.held[k]):
            h = held.get(key) if held is not None else None
            if held is None:
                ok.add(r)
            elif h is None:
                continue
            elif fingerprint and h.fingerprint != fingerprint:
                others.append(f"{self.addresses[k][r]} ({h.fingerprint})")
            else:
                holders += 1
                if h.reads(seq):
                    ok.add(r)
        if len(ok) == len(self.held[k]):
            return EVERY_REPLICA
        return Choice(frozenset(ok), holders, tuple(others))

    def describe(self, k: int, model: str) -> str:
        """What each replica of shard k holds of `model`, for an error message."""
        parts = []
        for addr, held in zip(self.addresses[k], self.held[k], strict=True):
            if held is None:
                parts.append(f"{addr}: not heard from")
                continue
            mine = sorted(v for (m, v) in held if m == model)
            parts.append(f"{addr}: {', '.join(mine) or 'nothing'} READY")
        return f"shard {k} replicas hold {model} versions: " + "; ".join(parts)

    async def refresh(self) -> None:
        """Ask every routed replica at once (one round at a time; callers share it)."""
        if self._refresh is None or self._refresh.done():
            self._refreshed_at = time.monotonic()
            self._refresh = asyncio.get_running_loop().create_task(self._round())
        await asyncio.shield(self._refresh)

    async def _round(self) -> None:
        async def one(k: int, r: int) -> None:
            try:
                self.record(k, r, await self._fetch(k, r, REFRESH_TIMEOUT_S))
            except (grpc.aio.AioRpcError, TimeoutError) as e:  # down: keeps its last answer
                log.debug("routing: ListVersions of %s failed: %s", self.addresses[k][r], e)

        await asyncio.gather(*(one(k, r) for k, reps in enumerate(self.addresses)
                               if self._routed[k] for r in range(len(reps))))

    def refresh_soon(self) -> None:
        """A replica refused a lookup: refresh now, unless a round ran a moment ago."""
        if not any(self._routed) or time.monotonic() - self._refreshed_at < MIN_REFRESH_INTERVAL_S:
            return
        if self._refresh is None or self._refresh.done():
            self._refreshed_at = time.monotonic()
            self._refresh = asyncio.get_running_loop().create_task(self._round())

    async def ensure_fresh(self, timeout_s: float) -> None:
        """Before failing a lookup on this table's word: a round no older than
        MIN_REFRESH_INTERVAL_S (waited for at most `timeout_s`)."""
        if self._refresh is not None and not self._refresh.done():
            pass  # join the round in flight
        elif time.monotonic() - self._refreshed_at < MIN_REFRESH_INTERVAL_S:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.refresh()

    def start(self) -> None:
        """Start the periodic refresh (idempotent; needs a running loop)."""
        if self._loop_task is None and self.refresh_s > 0 and any(self._routed):
            self._loop_task = asyncio.get_running_loop().create_task(self._periodic())

    async def _periodic(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug in one round must not stop routing from learning
                log.exception("routing: refresh round failed")
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        for task in (self._loop_task, self._refresh):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._refresh = None

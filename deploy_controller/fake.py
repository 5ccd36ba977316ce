"""An in-memory Fleet that follows the rankers' and shards' admin contracts.

For unit tests and dry runs. It enforces the same preconditions the real servers do
(prepare needs every replica READY with the same fingerprint; traffic only to
prepared versions; no unload while a version has traffic), records every call, lets
tests inject failures and hooks per (operation, server), and checks the invariant
the whole design exists for after every call: a version with traffic is prepared on
its ranker and READY on every shard replica. Breaches land in `violations`.

With `routing=True` it models the clients' version-aware routing (blue/green): a version
with traffic needs READY on at least one replica of every shard, prepare with
any_replica accepts one per shard, and unloading a version the rankers hold is a breach
only when no other replica of that shard still holds it. `budget_bytes` is per replica
and LoadVersion refuses what does not fit (RESOURCE_EXHAUSTED), as the servers do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy_controller.discovery import Topology
from deploy_controller.fleet import Fit, FleetError, RankerStatus, RankerVersion, ShardVersion

Hook = Callable[[str, str], Awaitable[None] | None]


@dataclass
class Behavior:
    """How a version serves in the fake: what its metrics will show."""

    error_rate: float = 0.0
    latency_s: float = 0.01
    mean_score: float = 0.1
    mismatches_per_scrape: int = 0


@dataclass
class _Ranker:
    model: str
    versions: dict[str, str] = field(default_factory=dict)  # version -> state
    split: dict[str, float] = field(default_factory=dict)
    active: str | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    seqs: dict[str, int] = field(default_factory=dict)  # version -> delta seq it reads

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("ranker_requests", "", ["version", "code"], registry=r)
        self.duration = Histogram("ranker_request_duration_seconds", "", ["version", "outcome"],
                                  registry=r)
        self.mismatch = Counter("ranker_version_mismatch", "", registry=r)
        self.score_sum = Gauge("ranker_score_sum", "", ["version"], registry=r)
        self.scores = Counter("ranker_scores", "", ["version"], registry=r)


class FakeFleet:
    def __init__(self, *, model: str = "m", versions: tuple[str, ...] = ("v1", "v2", "v3"),
                 active: str = "v1", rankers: int = 2, shards: int = 2, replicas: int = 2,
                 version_bytes: int = 100, budget_bytes: int = 1000,
                 requests_per_scrape: int = 50, routing: bool = False) -> None:
        self.routing = routing
        self.model = model
        self.fingerprints = {v: f"sha256:{v}" for v in versions}
        self.version_bytes = version_bytes
        self.budget_bytes = budget_bytes
        self.requests_per_scrape = requests_per_scrape
        self.behavior: dict[str, Behavior] = {v: Behavior() for v in versions}
        self.ranker_urls = tuple(f"http://ranker-{i}" for i in range(rankers))
        self.shard_addrs = tuple(tuple(f"shard-{k}-{j}:50051" for j in range(replicas))
                                 for k in range(shards))
        self.shards: dict[str, dict[str, ShardVersion]] = {
            a: {active: self._shard_version(active)} for reps in self.shard_addrs for a in reps}
        self.rankers = {u: _Ranker(model, {active: "active"}, {active: 1.0}, active)
                        for u in self.ranker_urls}
        self.fail_load: set[tuple[str, str]] = set()  # (server or "*", version)
        self.faults: dict[tuple[str, str], list[Exception]] = {}  # (op, server or "*")
        self.hooks: list[Hook] = []
        self.calls: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.readable_k = 2  # seqs each replica keeps readable (--readable-seqs)
        self.refuse: dict[int, str] = {}  # seq -> why ApplyDeltas refuses delta seq
        self.behavior_at_seq: dict[int, Behavior] = {}  # seq -> how the active version serves

    def _shard_version(self, version: str, state: str = "ready") -> ShardVersion:
        return ShardVersion(self.model, version, self.fingerprints[version], state,
                            self.version_bytes)

    async def _enter(self, op: str, server: str) -> None:
        self.calls.append((op, server))
        for hook in list(self.hooks):
            res = hook(op, server)
            if res is not None:
                await res
        for key in ((op, server), (op, "*")):
            queue = self.faults.get(key)
            if queue:
                raise queue.pop(0)
        await asyncio.sleep(0)

    def _holders(self, addr: str, version: str) -> list[str]:
        """Replicas of addr's shard (addr included) holding `version` READY."""
        reps = next(r for r in self.shard_addrs if addr in r)
        return [a for a in reps if (sv := self.shards[a].get(version)) is not None
                and sv.state == "ready"]

    def _needed(self) -> list[str]:
        """The replicas that must hold a version: all, or one per shard with routing."""
        if not self.routing:
            return list(self.shards)
        return [reps[0] for reps in self.shard_addrs]

    def _check(self) -> None:
        for url, r in self.rankers.items():
            for v, share in r.split.items():
                if share <= 0:
                    continue
                if r.versions.get(v) not in ("prepared", "active"):
                    self.violations.append(f"{url}: traffic on {v} which is {r.versions.get(v)}")
                for first in self._needed():
                    addr = (self._holders(first, v) or [first])[0] if self.routing else first
                    held = self.shards[addr]
                    if v not in held or held[v].state != "ready":
                        self.violations.append(f"{url}: traffic on {v} but {addr} lacks it")
                    elif r.seqs.get(v, 0) not in held[v].readable_seqs:
                        self.violations.append(f"{url}: reads {v} at seq {r.seqs.get(v, 0)} "
                                               f"but {addr} reads {held[v].readable_seqs}")

    # ------------------------------------------------------------------ Fleet

    async def topology(self) -> Topology:
        return Topology(self.ranker_urls, self.shard_addrs)

    async def ranker_status(self, url: str) -> RankerStatus:
        await self._enter("ranker_status", url)
        r = self.rankers[url]
        return RankerStatus(r.model, r.active, dict(r.split), tuple(
            RankerVersion(v, self.fingerprints[v], s, r.split.get(v, 0.0), seq=r.seqs.get(v, 0))
            for v, s in r.versions.items()))

    async def ranker_load(self, url: str, version: str) -> None:
        await self._enter("ranker_load", url)
        if version not in self.fingerprints:
            raise FleetError(url, f"HTTP 404: no version {version}", status=404)
        if (url, version) in self.fail_load or ("*", version) in self.fail_load:
            raise FleetError(url, f"HTTP 422: {version} failed verification", status=422)
        self.rankers[url].versions.setdefault(version, "loaded")

    async def ranker_prepare(self, url: str, version: str, any_replica: bool = False) -> None:
        await self._enter("ranker_prepare", url)
        r = self.rankers[url]
        if version not in r.versions:
            raise FleetError(url, f"HTTP 404: {version} not loaded", status=404)
        if any_replica and not self.routing:
            raise FleetError(url, "HTTP 422: this ranker does not route by version", status=422)
        for first in (self._needed() if any_replica else list(self.shards)):
            addr = (self._holders(first, version) or [first])[0] if any_replica else first
            sv = self.shards[addr].get(version)
            if sv is None or sv.state != "ready" or sv.fingerprint != self.fingerprints[version]:
                raise FleetError(url, f"HTTP 409: {addr} does not hold {version} ready",
                                 retryable=True, status=409)
        if r.versions[version] == "loaded":
            r.versions[version] = "prepared"

    async def ranker_activate(self, url: str, version: str) -> None:
        await self._enter("ranker_activate", url)
        r = self.rankers[url]
        if r.versions.get(version) not in ("prepared", "active"):
            raise FleetError(url, f"HTTP 409: {version} is not prepared", status=409)
        for v in r.versions:
            if r.versions[v] == "active":
                r.versions[v] = "prepared"
        r.versions[version] = "active"
        r.active, r.split = version, {version: 1.0}
        self._check()

    async def ranker_split(self, url: str, split: dict[str, float]) -> None:
        await self._enter("ranker_split", url)
        r = self.rankers[url]
        for v, share in split.items():
            if share > 0 and r.versions.get(v) not in ("prepared", "active"):
                raise FleetError(url, f"HTTP 409: {v} is not prepared", status=409)
        if abs(sum(split.values()) - 1.0) > 1e-6:
            raise FleetError(url, f"HTTP 422: split {split} does not sum to 1", status=422)
        r.split = {v: s for v, s in split.items() if s > 0}
        self._check()

    async def ranker_unload(self, url: str, version: str, timeout_s: float) -> None:
        await self._enter("ranker_unload", url)
        r = self.rankers[url]
        if r.split.get(version, 0.0) > 0:
            raise FleetError(url, f"HTTP 409: {version} still has traffic", retryable=True,
                             status=409)
        r.versions.pop(version, None)
        if r.active == version:
            r.active = None

    async def ranker_metrics(self, url: str) -> str:
        await self._enter("ranker_metrics", url)
        r = self.rankers[url]
        for v, share in r.split.items():
            n = round(self.requests_per_scrape * share)
            b = self.behavior_at_seq.get(r.seqs.get(v, 0), self.behavior[v])
            errors = round(n * b.error_rate)
            if n - errors:
                r.requests.labels(v, "200").inc(n - errors)
            if errors:
                r.requests.labels(v, "503").inc(errors)
            for _ in range(n):
                r.duration.labels(v, "ok").observe(b.latency_s)
            r.score_sum.labels(v).inc(n * b.mean_score)
            r.scores.labels(v).inc(n)
            r.mismatch.inc(b.mismatches_per_scrape)
        return generate_latest(r.registry).decode()

    async def shard_versions(self, addr: str, model: str) -> list[ShardVersion]:
        await self._enter("shard_versions", addr)
        return list(self.shards[addr].values())

    async def shard_check_fit(self, addr: str, model: str, version: str) -> Fit:
        await self._enter("shard_check_fit", addr)
        used = sum(v.bytes for v in self.shards[addr].values())
        avail = self.budget_bytes - used
        fits = self.version_bytes <= avail
        return Fit(fits, self.version_bytes, avail,
                   "" if fits else f"needs {self.version_bytes} bytes, {avail} available")

    async def shard_load(self, addr: str, model: str, version: str) -> ShardVersion:
        await self._enter("shard_load", addr)
        if version not in self.fingerprints:
            raise FleetError(addr, f"NOT_FOUND: no version {version}")
        if (addr, version) in self.fail_load or ("*", version) in self.fail_load:
            sv = ShardVersion(model, version, "", "failed", 0, "checksum mismatch (corrupt)")
            return sv
        held = self.shards[addr]
        if version not in held:
            used = sum(v.bytes for v in held.values())
            if used + self.version_bytes > self.budget_bytes:
                raise FleetError(addr, f"LoadVersion: RESOURCE_EXHAUSTED: {version} needs "
                                 f"{self.version_bytes} bytes, {self.budget_bytes - used} "
                                 "available")
            held[version] = self._shard_version(version)
        return held[version]

    async def shard_unload(self, addr: str, model: str, version: str,
                           drain_timeout_s: float) -> ShardVersion:
        await self._enter("shard_unload", addr)
        others = [a for a in self._holders(addr, version) if a != addr] if self.routing else []
        for url, r in self.rankers.items():
            if (r.split.get(version, 0.0) > 0 or version in r.versions) and not others:
                self.violations.append(f"{addr}: unloaded {version} while {url} still holds it")
        self.shards[addr].pop(version, None)
        return ShardVersion(model, version, state="absent")

    async def ranker_set_seq(self, url: str, version: str, seq: int,
                             fingerprint: str = "") -> None:
        await self._enter("ranker_set_seq", url)
        r = self.rankers[url]
        if version not in r.versions:
            raise FleetError(url, f"HTTP 404: {version} not loaded", status=404)
        r.seqs[version] = seq
        self._check()

    async def shard_apply_deltas(self, addr: str, model: str, version: str, seq: int,
                                 fingerprint: str) -> ShardVersion:
        await self._enter("shard_apply_deltas", addr)
        sv = self.shards[addr].get(version)
        if sv is None or sv.state != "ready":
            raise FleetError(addr, f"ApplyDeltas: FAILED_PRECONDITION: {version} not loaded",
                             reason="version_not_loaded")
        bad = [s for s in sorted(self.refuse) if sv.applied_seq < s <= seq]
        if bad and seq not in sv.readable_seqs:
            raise FleetError(addr, f"ApplyDeltas: FAILED_PRECONDITION: {self.refuse[bad[0]]}",
                             reason="delta_refused")
        # The contract: seq becomes the most recently applied (also when it was readable
        # already), and the K most recently applied stay readable.
        readable = [s for s in sv.readable_seqs if s != seq] + [seq]
        sv = replace(sv, readable_seqs=tuple(sorted(readable[-self.readable_k:])),
                     applied_seq=seq, overlay_bytes=seq)
        self.shards[addr][version] = sv
        self._check()
        return sv

    async def close(self) -> None:
        return None

    # ------------------------------------------------------------------ test helpers

    def serving(self) -> set[str]:
        """Every version that has traffic on some ranker."""
        return {v for r in self.rankers.values() for v, s in r.split.items() if s > 0}

    def held(self, version: str) -> bool:
        """Whether any ranker or replica still holds `version`."""
        return (any(version in r.versions for r in self.rankers.values())
                or any(version in h for h in self.shards.values()))

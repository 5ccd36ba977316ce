"""The fleet as the controller sees it: a protocol, its value types, and the real one.

The executor only ever talks to a `Fleet`: one call acts on one server (a ranker's
base URL or one embedding-shard replica's gRPC address), and the executor does the
fan-out to every ranker and every replica. Unit tests drive the executor with the
in-memory `deploy_controller.fake.FakeFleet`; production uses `RemoteFleet`, which
speaks the rankers' HTTP admin API and the shards' admin gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from deploy_controller.discovery import Discovery, Topology


class FleetError(Exception):
    """A fleet call that failed; `retryable` says whether trying again may help."""

    def __init__(self, server: str, message: str, *, retryable: bool = False,
                 status: int | None = None, reason: str = "") -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.message = message
        self.retryable = retryable
        self.status = status
        self.reason = reason  # a shard's x-embedding-reason (delta_refused, ...), if any


@dataclass(frozen=True)
class RankerVersion:
    """One version held by a ranker (GET /admin/v1/versions, `versions[]`)."""

    version: str
    fingerprint: str = ""
    state: str = "loaded"  # loaded | prepared | active | unloading
    traffic_share: float = 0.0
    in_flight: int = 0
    requests_total: int = 0
    seq: int = 0  # the delta seq the ranker reads this version at


@dataclass(frozen=True)
class RankerStatus:
    """A ranker's answer to GET /admin/v1/versions."""

    model: str
    active: str | None
    split: dict[str, float]
    versions: tuple[RankerVersion, ...]

    def get(self, version: str) -> RankerVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    def servable(self, version: str) -> bool:
        v = self.get(version)
        return v is not None and v.state in ("prepared", "active")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "active": self.active, "split": self.split,
                "versions": [v.__dict__ for v in self.versions]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankerStatus:
        return cls(
            model=str(d["model"]), active=d.get("active"),
            split={str(k): float(v) for k, v in (d.get("split") or {}).items()},
            versions=tuple(
                RankerVersion(version=str(v["version"]), fingerprint=str(v.get("fingerprint", "")),
                              state=str(v.get("state", "loaded")),
                              traffic_share=float(v.get("traffic_share", 0.0)),
                              in_flight=int(v.get("in_flight", 0)),
                              requests_total=int(v.get("requests_total", 0)),
                              seq=int(v.get("seq", 0)))
                for v in d.get("versions", [])))


@dataclass(frozen=True)
class ShardVersion:
    """One version held by one shard replica (ListVersions / LoadVersion answer)."""

    model: str
    version: str
    fingerprint: str = ""
    state: str = "ready"  # loading | ready | unloading | failed
    bytes: int = 0
    error: str = ""
    in_flight: int = 0
    readable_seqs: tuple[int, ...] = (0,)  # delta seqs lookups may name
    applied_seq: int = 0  # the newest seq applied
    overlay_bytes: int = 0


@dataclass(frozen=True)
class Fit:
    """CheckFit's answer: would the version fit this replica's memory budget now?"""

    fits: bool
    required_bytes: int
    available_bytes: int
    reason: str = ""


class Fleet(Protocol):
    """Every operation the controller needs, one server per call."""

    async def topology(self) -> Topology: ...

    async def ranker_status(self, url: str) -> RankerStatus: ...

    async def ranker_load(self, url: str, version: str) -> None: ...

    async def ranker_prepare(self, url: str, version: str, any_replica: bool = False) -> None:
        """The prepare handshake; any_replica: one replica per shard holding the version
        READY is enough (blue/green), not every replica."""

    async def ranker_activate(self, url: str, version: str) -> None: ...

    async def ranker_split(self, url: str, split: dict[str, float]) -> None: ...

    async def ranker_unload(self, url: str, version: str, timeout_s: float) -> None: ...

    async def ranker_metrics(self, url: str) -> str: ...

    async def ranker_set_seq(self, url: str, version: str, seq: int,
                             fingerprint: str = "") -> None: ...

    async def shard_versions(self, addr: str, model: str) -> list[ShardVersion]: ...

    async def shard_check_fit(self, addr: str, model: str, version: str) -> Fit: ...

    async def shard_load(self, addr: str, model: str, version: str) -> ShardVersion: ...

    async def shard_unload(self, addr: str, model: str, version: str,
                           drain_timeout_s: float) -> ShardVersion: ...

    async def shard_apply_deltas(self, addr: str, model: str, version: str, seq: int,
                                 fingerprint: str) -> ShardVersion: ...

    async def close(self) -> None: ...


class RemoteFleet:
    """The real fleet: rankers over HTTP, shard replicas over gRPC, found by discovery."""

    def __init__(self, discovery: Discovery, token: str, *, http_timeout_s: float = 120.0,
                 grpc_timeout_s: float = 600.0) -> None:
        # Imported here so that the protocol and the fake need neither httpx nor grpc.
        from deploy_controller.ranker_admin import RankerAdmin
        from deploy_controller.shard_admin import ShardAdmin

        self._discovery = discovery
        self._rankers = RankerAdmin(token, timeout_s=http_timeout_s)
        self._shards = ShardAdmin(token, timeout_s=grpc_timeout_s)

    async def topology(self) -> Topology:
        return await self._discovery.topology()

    async def ranker_status(self, url: str) -> RankerStatus:
        return await self._rankers.status(url)

    async def ranker_load(self, url: str, version: str) -> None:
        await self._rankers.load(url, version)

    async def ranker_prepare(self, url: str, version: str, any_replica: bool = False) -> None:
        await self._rankers.prepare(url, version, any_replica)

    async def ranker_activate(self, url: str, version: str) -> None:
        await self._rankers.activate(url, version)

    async def ranker_split(self, url: str, split: dict[str, float]) -> None:
        await self._rankers.split(url, split)

    async def ranker_unload(self, url: str, version: str, timeout_s: float) -> None:
        await self._rankers.unload(url, version, timeout_s)

    async def ranker_metrics(self, url: str) -> str:
        return await self._rankers.metrics(url)

    async def ranker_set_seq(self, url: str, version: str, seq: int,
                             fingerprint: str = "") -> None:
        await self._rankers.set_seq(url, version, seq, fingerprint)

    async def shard_versions(self, addr: str, model: str) -> list[ShardVersion]:
        return await self._shards.versions(addr, model)

    async def shard_check_fit(self, addr: str, model: str, version: str) -> Fit:
        return await self._shards.check_fit(addr, model, version)

    async def shard_load(self, addr: str, model: str, version: str) -> ShardVersion:
        return await self._shards.load(addr, model, version)

    async def shard_unload(self, addr: str, model: str, version: str,
                           drain_timeout_s: float) -> ShardVersion:
        return await self._shards.unload(addr, model, version, drain_timeout_s)

    async def shard_apply_deltas(self, addr: str, model: str, version: str, seq: int,
                                 fingerprint: str) -> ShardVersion:
        return await self._shards.apply_deltas(addr, model, version, seq, fingerprint)

    async def close(self) -> None:
        await self._rankers.close()
        await self._shards.close()

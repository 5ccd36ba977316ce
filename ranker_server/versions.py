"""The ranker's loaded versions: states, traffic split, per-request pinning, in-flight counts.

A request takes a Lease at admission: one version, drawn from the traffic split (or
named by the request), held until its batch has finished, so every step of that request
uses the same version. Each version carries the delta seq new batches read it at
(`seq`); the batcher pins it once per batch, when the batch forms. Unloading waits for
a version's leases to reach zero. This module is pure state on the event loop; loading
files and talking to shards is lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from modelpack.delta import DeltaManifest
from modelpack.manifest import Manifest
from modelpack.schema import FeatureSchema, TableSpec
from ranker_server.errors import AdminError, RankError

if TYPE_CHECKING:  # prometheus stays out of the pipeline's imports
    from ranker_server.metrics import Metrics

SPLIT_TOLERANCE = 1e-6


class State(StrEnum):
    LOADED = "loaded"        # dense model in memory; not yet confirmed by the shards
    PREPARED = "prepared"    # every shard replica reported it READY with our fingerprint
    ACTIVE = "active"        # prepared and the version with the largest traffic share
    UNLOADING = "unloading"  # waiting for its in-flight requests, then dropped


@dataclass(eq=False)
class LoadedVersion:
    """One version's dense model (on the device) and what the pipeline needs of its manifest."""

    manifest: Manifest
    path: Path
    dense: nn.Module
    prepared: bool = False
    unloading: bool = False
    in_flight: int = 0
    requests_total: int = 0
    seq: int = 0  # the delta seq batches formed from now on read at (0: the version's rows)
    delta: DeltaManifest | None = None  # delta `seq`'s manifest (None at 0)
    # Delta manifests checked as a chain (ranker_server.deltas), by seq: immutable once written.
    checked: dict[int, DeltaManifest] = field(default_factory=dict)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tables: dict[str, TableSpec] = field(init=False)
    dim: int = field(init=False)

    def __post_init__(self) -> None:
        self.tables = {t.name: t for t in self.manifest.tables}
        self.dim = next(iter(self.tables.values())).dim
        self.idle.set()

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def schema(self) -> FeatureSchema:
        return self.manifest.schema


class Lease:
    """A request's pin on one version, counted in its in-flight requests until released.

    The ownership rule: whoever holds a lease releases it, exactly once. The request
    handler holds it in a `with` block (released on leaving it) until Batcher.submit
    takes it over with `take()`; from then on the batcher releases it, at the one place
    a request leaves the batcher. Extra release() calls are no-ops.
    """

    def __init__(self, registry: VersionRegistry, version: LoadedVersion) -> None:
        self._registry = registry
        self.version = version
        self._released = False

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take(self) -> Lease:
        """Move the pin to a new Lease for a new owner; this one then releases nothing."""
        if self._released:
            raise RuntimeError(f"lease on {self.version.version} already released")
        self._released = True
        return Lease(self._registry, self.version)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self.version)


class VersionRegistry:
    """Versions of one model held by this ranker, and which of them take traffic."""

    def __init__(self, model: str, metrics: Metrics, rng: random.Random | None = None) -> None:
        self.model = model
        self.metrics = metrics
        self.versions: dict[str, LoadedVersion] = {}
        self.split: dict[str, float] = {}
        self.active: str | None = None
        self._rng = rng or random.Random()

    def get(self, version: str) -> LoadedVersion:
        lv = self.versions.get(version)
        if lv is None:
            raise AdminError(404, f"version {version!r} of {self.model} is not loaded on this "
                             f"ranker (loaded: {sorted(self.versions) or 'none'})")
        return lv

    def state(self, lv: LoadedVersion) -> State:
        if lv.unloading:
            return State.UNLOADING
        if lv.version == self.active:
            return State.ACTIVE
        return State.PREPARED if lv.prepared else State.LOADED

    def add(self, lv: LoadedVersion) -> None:
        self.versions[lv.version] = lv
        self.metrics.traffic_share.labels(lv.version).set(0.0)
        self.metrics.inflight.labels(lv.version).set(0)
        self.metrics.delta_served(self.model, lv.version, lv.seq, 0.0, fresh=False)

    def remove(self, version: str) -> LoadedVersion:
        lv = self.versions.pop(version)
        self.metrics.forget_version(self.model, version)
        return lv

    def set_seq(self, lv: LoadedVersion, seq: int, delta: DeltaManifest | None, *,
                fresh: bool) -> int:
        """Batches of `lv` formed from now on read at `seq` (checked by the caller); returns
        the previous seq. `fresh`: a live advance, recorded in the freshness histogram."""
        old, lv.seq, lv.delta = lv.seq, seq, delta
        self.metrics.delta_served(self.model, lv.version, seq,
                                  delta.written_at if delta is not None else 0.0,
                                  fresh=fresh and seq > old)
        return old

    def _servable(self, version: str) -> LoadedVersion:
        lv = self.get(version)
        if lv.unloading:
            raise AdminError(409, f"version {version!r} is being unloaded")
        if not lv.prepared:
            raise AdminError(409, f"version {version!r} is loaded but not prepared: run "
                             f"POST /admin/v1/versions/{version}/prepare first")
        return lv

    def activate(self, version: str) -> None:
        """Make `version` (prepared) the only one taking traffic."""
        self._servable(version)
        self.set_split({version: 1.0})

    def set_split(self, split: dict[str, float]) -> None:
        """Route new requests by `split` (prepared versions, shares >= 0 summing to 1)."""
        if not split:
            raise AdminError(422, "split: must name at least one version")
        for name, share in split.items():
            if isinstance(share, bool) or not isinstance(share, int | float) or not (
                    math.isfinite(share) and share >= 0):
                raise AdminError(422, f"split: share of {name!r} must be a number >= 0, "
                                 f"got {share!r}")
        total = math.fsum(split.values())
        if abs(total - 1.0) > SPLIT_TOLERANCE:
            raise AdminError(422, f"split: shares must sum to 1 (±{SPLIT_TOLERANCE}), got {total}")
        for name in split:
            if name not in self.versions:  # a body naming it, not a URL: a conflict, not a 404
                raise AdminError(409, f"split: version {name!r} is not loaded on this ranker "
                                 f"(loaded: {sorted(self.versions) or 'none'})")
            self._servable(name)
        new = {name: float(share) for name, share in split.items() if share > 0}
        best = max(new.values())
        leaders = sorted(n for n, s in new.items() if s == best)
        self.active = self.active if self.active in leaders else leaders[0]
        self.split = new
        for name in self.versions:
            self.metrics.traffic_share.labels(name).set(new.get(name, 0.0))

    def acquire(self, version: str | None = None) -> Lease:
        """Pin a new request to a version: `version` if given, else one drawn by the split."""
        if version is not None:
            lv = self.versions.get(version)
            if lv is None or lv.unloading or not lv.prepared:
                raise RankError(404, "unknown_version",
                                f"version: {version!r} is not a prepared version of "
                                f"{self.model} on this ranker", field="version")
        elif not self.split:
            raise RankError(503, "no_active_version",
                            f"no version of {self.model} is active on this ranker yet")
        elif len(self.split) == 1:
            lv = self.versions[next(iter(self.split))]
        else:
            names = list(self.split)
            lv = self.versions[self._rng.choices(names, weights=[self.split[n] for n in names])[0]]
        lv.in_flight += 1
        lv.requests_total += 1
        lv.idle.clear()
        self.metrics.inflight.labels(lv.version).set(lv.in_flight)
        return Lease(self, lv)

    def _release(self, lv: LoadedVersion) -> None:
        lv.in_flight -= 1
        if lv.in_flight == 0:
            lv.idle.set()
        if lv.version in self.versions:
            self.metrics.inflight.labels(lv.version).set(lv.in_flight)

    def info(self, lv: LoadedVersion) -> dict[str, Any]:
        return {"version": lv.version, "fingerprint": lv.fingerprint, "state": str(self.state(lv)),
                "traffic_share": self.split.get(lv.version, 0.0), "in_flight": lv.in_flight,
                "requests_total": lv.requests_total, "seq": lv.seq,
                "delta_fingerprint": lv.delta.fingerprint if lv.delta is not None else "",
                "delta_written_at": lv.delta.written_at if lv.delta is not None else 0.0}

    def listing(self) -> dict[str, Any]:
        return {"model": self.model, "active": self.active, "split": dict(self.split),
                "versions": [self.info(lv) for _, lv in sorted(self.versions.items())]}

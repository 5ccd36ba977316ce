"""Version lifecycle: load from the store, prepare against the shards, activate, unload,
and move a version to another delta seq.

Loading reads files and builds the dense model, so it runs on a worker thread; admin
changes are serialized by one lock so two loads of the same version cannot race.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelpack import desired
from modelpack.delta import DeltaError
from modelpack.dense import load_dense
from modelpack.desired import DesiredStateError
from modelpack.manifest import VerifyError, read_manifest, verify
from modelpack.schema import SchemaError, check_name
from ranker_server.config import RankerConfig
from ranker_server.deltas import check_chain
from ranker_server.device import Device
from ranker_server.errors import AdminError
from ranker_server.pipeline import warm_up
from ranker_server.sources import PrepareError, TableSource
from ranker_server.versions import LoadedVersion, VersionRegistry

log = logging.getLogger(__name__)
_SERVE_CHECK_CACHE_S = 1.0  # /readyz probes within a second share one ListVersions round
_SERVE_CHECK_TIMEOUT_S = 1.0  # a probe must answer faster than a kubelet's timeout


class Lifecycle:
    def __init__(self, config: RankerConfig, registry: VersionRegistry, source: TableSource,
                 device: Device) -> None:
        self.config = config
        self.registry = registry
        self.source = source
        self.device = device
        self.startup_error: str | None = "startup version not prepared yet"
        self._lock = asyncio.Lock()
        self._serve_check: tuple[float, str | None] = (-1.0, None)

    async def load(self, version: str) -> LoadedVersion:
        """Load STORE/MODEL/version beside the others; already loaded -> the same version."""
        try:
            check_name("version", version)
        except SchemaError as e:
            raise AdminError(422, str(e)) from None
        async with self._lock:
            lv = self.registry.versions.get(version)
            if lv is not None:
                if lv.unloading:
                    raise AdminError(409, f"version {version!r} is being unloaded; retry after")
                return lv
            vdir = self.config.store / self.registry.model / version
            if not vdir.is_dir():
                raise AdminError(404, f"no version directory {vdir}")
            lv = await asyncio.to_thread(self._load_files, vdir)
            self.registry.add(lv)
            log.info("loaded %s/%s (%s)", lv.manifest.model, version, lv.fingerprint)
            return lv

    def _load_files(self, vdir: Path) -> LoadedVersion:
        try:
            m = read_manifest(vdir)
            if m.model != self.registry.model:
                raise AdminError(422, f"{vdir}: manifest is for model {m.model!r}, this ranker "
                                 f"serves {self.registry.model!r}")
            # The dense weights only: table files are the shards' (or LocalTables') to verify.
            verify(vdir, only={m.dense.path})
            dense = self.device.place_module(
                load_dense(vdir / m.dense.path, m.dense.architecture, m.dense.config))
            self.source.open_version(m)
        except (SchemaError, VerifyError, ValueError, OSError) as e:
            raise AdminError(422, f"cannot load {vdir}: {e}") from None
        return LoadedVersion(manifest=m, path=vdir, dense=dense)

    async def prepare(self, version: str, min_replicas: int | None = None) -> LoadedVersion:
        """The handshake: the shard replicas hold `version` READY with our fingerprint
        (every one, or `min_replicas` per shard: TableSource.prepare)."""
        lv = self.registry.get(version)
        if lv.unloading:
            raise AdminError(409, f"version {version!r} is being unloaded")
        try:
            await self.source.prepare(lv.manifest, min_replicas=min_replicas)
        except PrepareError as e:
            raise AdminError(409, str(e)) from None
        if not lv.prepared:
            t0 = time.perf_counter()
            # CUDA initializes lazily per kernel shape; the CPU needs only one batch.
            sizes = sorted({1, min(256, self.config.max_batch_candidates),
                            self.config.max_batch_candidates}) if self.device.is_cuda else [1]
            await self.device.compute(self.device.guard, warm_up, self.device, lv, sizes)
            log.info("prepared %s/%s: every shard serves %s (device warmed up in %.0f ms)",
                     lv.manifest.model, version, lv.fingerprint, (time.perf_counter() - t0) * 1e3)
        lv.prepared = True
        return lv

    async def activate(self, version: str) -> None:
        async with self._lock:
            self.registry.activate(version)
        log.info("activated %s/%s", self.registry.model, version)

    async def set_split(self, split: dict[str, float]) -> None:
        async with self._lock:
            self.registry.set_split(split)
        log.info("traffic split of %s is now %s", self.registry.model, self.registry.split)

    async def set_seq(self, version: str, seq: int, fingerprint: str = "", *,
                      fresh: bool = True) -> int:
        """Read `version` at delta `seq` in batches formed from now on, once deltas 1..seq
        chain in our store (and delta seq's fingerprint is `fingerprint`, if given);
        returns the previous seq. Lowering it (a revert) is allowed."""
        async with self._lock:
            lv = self.registry.get(version)
            if lv.unloading:
                raise AdminError(409, f"version {version!r} is being unloaded")
            where = f"{self.registry.model}/{version} at delta seq {seq}"
            try:
                delta = await asyncio.to_thread(check_chain, lv.path, lv.manifest, seq,
                                                lv.checked)
            except DeltaError as e:
                raise AdminError(422, f"cannot read {where}: {e}") from None
            # At seq 0 the chain's start: the version's own fingerprint.
            have = delta.fingerprint if delta is not None else lv.fingerprint
            if fingerprint and fingerprint != have:
                raise AdminError(409, f"cannot read {where}: its fingerprint in {lv.path} is "
                                 f"{have}, not {fingerprint}")
            try:  # local tables read the deltas' rows: verified and folded before the switch
                await asyncio.to_thread(self.source.open_seq, lv.manifest, seq)
            except DeltaError as e:
                raise AdminError(422, f"cannot read {where}: {e}") from None
            old = self.registry.set_seq(lv, seq, delta, fresh=fresh)
        if old != seq:
            log.info("%s/%s is now read at delta seq %d (was %d)", self.registry.model, version,
                     seq, old)
        return old

    async def unload(self, version: str, timeout_s: float) -> None:
        """Refuse while it takes traffic; else wait for its in-flight requests and drop it."""
        async with self._lock:
            lv = self.registry.get(version)
            if self.registry.split.get(version, 0.0) > 0:
                raise AdminError(409, f"version {version!r} still has traffic share "
                                 f"{self.registry.split[version]}; move its traffic first")
            if lv.unloading:
                raise AdminError(409, f"version {version!r} is already being unloaded")
            lv.unloading = True
        try:
            await asyncio.wait_for(lv.idle.wait(), timeout_s)
        except TimeoutError:
            lv.unloading = False
            raise AdminError(409, f"version {version!r} still has {lv.in_flight} requests in "
                             f"flight after {timeout_s} s; not unloaded") from None
        self.registry.remove(version)
        self.source.close_version(version)
        del lv
        await self.device.compute(self.device.release_memory)
        log.info("unloaded %s/%s", self.registry.model, version)

    async def load_startup(self) -> StartupPlan:
        """Load the startup plan's versions; if one fails, --version alone (logged)."""
        plan = startup_plan(self.config)
        try:
            for v in plan.versions:
                await self.load(v)
                if plan.deltas.get(v, 0):  # a restart comes back at the committed seq
                    await self.set_seq(v, plan.deltas[v], fresh=False)
        except AdminError as e:
            if plan.split == {self.config.version: 1.0} and len(plan.versions) == 1:
                raise
            log.error("startup: cannot load what %s names (%s): serving --version %s",
                      plan.source, e.message, self.config.version)
            plan = StartupPlan((self.config.version,), {self.config.version: 1.0}, "--version")
            await self.load(self.config.version)
        return plan

    async def bring_up(self, plan: StartupPlan) -> None:
        """Startup: prepare the plan's versions until the shards hold them, serving its split
        as soon as the versions with traffic are prepared."""
        attempt, serving = 0, False
        while True:
            errors = []
            for v in plan.versions:
                lv = self.registry.versions.get(v)
                if lv is None or lv.prepared:
                    continue
                try:
                    await self.prepare(v)
                except AdminError as e:
                    errors.append(f"{v}: {e.message}")
            ready = all((lv := self.registry.versions.get(v)) is not None and lv.prepared
                        for v in plan.split)
            if ready and not serving:
                if self.registry.active is None:  # an admin call may have got there first
                    await self.set_split(plan.split)
                serving, self.startup_error = True, None
            if serving and not errors:
                return
            if not serving:
                self.startup_error = f"startup versions not prepared: {'; '.join(errors)}"
            if attempt % 20 == 0:
                log.warning("startup (%s): not prepared yet: %s (retrying every %.1f s)",
                            plan.source, "; ".join(errors), self.config.startup_retry_s)
            attempt += 1
            await asyncio.sleep(self.config.startup_retry_s)

    async def unservable(self) -> str | None:
        """None when every shard replica can serve every version with traffic now.

        The prepare handshake's own checks (READY, our fingerprint, shard index), not mere
        reachability: a restarted shard without the active version makes this say so.
        Cached for a second, so probes do not multiply ListVersions calls.
        """
        if self.device.broken is not None:
            return f"device failed: {self.device.broken}"
        if self.registry.active is None:
            return self.startup_error or "no active version"
        now = time.monotonic()
        if now - self._serve_check[0] < _SERVE_CHECK_CACHE_S:
            return self._serve_check[1]
        reason = None
        for v in sorted(self.registry.split):
            lv = self.registry.versions.get(v)
            if lv is None:
                continue
            try:
                await asyncio.wait_for(self.source.prepare(lv.manifest), _SERVE_CHECK_TIMEOUT_S)
            except PrepareError as e:
                reason = f"cannot serve {v}: {e}"
            except TimeoutError:
                reason = (f"cannot serve {v}: shard replicas did not answer ListVersions "
                          f"within {_SERVE_CHECK_TIMEOUT_S} s")
            if reason is not None:
                break
        self._serve_check = (time.monotonic(), reason)
        return reason


@dataclass(frozen=True)
class StartupPlan:
    """What a ranker loads and serves at startup: versions (active first) and the split."""

    versions: tuple[str, ...]
    split: dict[str, float]
    source: str  # where it came from, for the log
    deltas: dict[str, int] = field(default_factory=dict)  # committed delta seq per version


def startup_plan(config: RankerConfig) -> StartupPlan:
    """The desired state's versions and split for this model, else --version alone."""
    fallback = StartupPlan((config.version,), {config.version: 1.0}, "--version")
    if config.desired_state is None:
        return fallback
    try:
        want = desired.read(config.desired_state).get(config.model)
    except DesiredStateError as e:
        log.error("desired state ignored, starting from --version %s: %s", config.version, e)
        return fallback
    if want is None:
        log.info("desired state %s names no %s yet: starting from --version %s",
                 config.desired_state, config.model, config.version)
        return fallback
    log.info("desired state of %s: versions %s, split %s, delta seqs %s (rollout %s, seq %d); "
             "--version %s not used", config.model, list(want.versions), want.split,
             want.deltas, want.rollout, want.seq, config.version)
    return StartupPlan(want.versions, dict(want.split),
                       f"desired state {config.desired_state} seq {want.seq}",
                       {v: want.delta_seq(v) for v in want.versions if want.delta_seq(v)})

"""Version lifecycle: load from the store, prepare against the shards, activate, unload.

Loading reads files and builds the dense model, so it runs on a worker thread; admin
changes are serialized by one lock so two loads of the same version cannot race.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from modelpack.dense import load_dense
from modelpack.manifest import VerifyError, read_manifest, verify
from modelpack.schema import SchemaError, check_name
from ranker_server.config import RankerConfig
from ranker_server.device import Device
from ranker_server.errors import AdminError
from ranker_server.sources import PrepareError, TableSource
from ranker_server.versions import LoadedVersion, VersionRegistry

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self, config: RankerConfig, registry: VersionRegistry, source: TableSource,
                 device: Device) -> None:
        self.config = config
        self.registry = registry
        self.source = source
        self.device = device
        self.startup_error: str | None = "startup version not prepared yet"
        self._lock = asyncio.Lock()

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

    async def prepare(self, version: str) -> LoadedVersion:
        """The handshake: every shard replica holds `version` READY with our fingerprint."""
        lv = self.registry.get(version)
        if lv.unloading:
            raise AdminError(409, f"version {version!r} is being unloaded")
        try:
            await self.source.prepare(lv.manifest)
        except PrepareError as e:
            raise AdminError(409, str(e)) from None
        if not lv.prepared:
            log.info("prepared %s/%s: every shard serves %s", lv.manifest.model, version,
                     lv.fingerprint)
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
        self.device.release_memory()
        log.info("unloaded %s/%s", self.registry.model, version)

    async def bring_up(self, version: str) -> None:
        """Startup: prepare `version` until the shards have it, then activate it."""
        attempt = 0
        while True:
            try:
                await self.prepare(version)
                if self.registry.active is None:
                    await self.activate(version)
                self.startup_error = None
                return
            except AdminError as e:
                self.startup_error = f"startup version {version} not prepared: {e.message}"
                if attempt % 20 == 0:
                    log.warning("%s (retrying every %.1f s)", self.startup_error,
                                self.config.startup_retry_s)
            attempt += 1
            await asyncio.sleep(self.config.startup_retry_s)

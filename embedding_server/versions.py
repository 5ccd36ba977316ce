"""The versions a shard holds: LOADING -> READY -> UNLOADING -> gone (or FAILED).

All state lives behind one lock; the slow parts (hashing, mapping, draining) run outside
it. Memory is reserved when a load starts, so two concurrent loads cannot both squeeze
under the budget. A lookup holds its version for its whole run (`acquire`), which is
what UnloadVersion drains and what keeps the mapping alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from embedding_server.deltas import VersionDeltas
from embedding_server.errors import (
    FINGERPRINT_MISMATCH,
    SEQ_NOT_APPLIED,
    VERSION_NOT_LOADED,
    ServiceError,
)
from embedding_server.overlay import OverlayState, build_state, overlay_bytes
from embedding_server.table_store import (
    LoadedVersion,
    StoreError,
    VersionPlan,
    open_version,
    plan_version,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]
_STORE_CODES = {"not_found": grpc.StatusCode.NOT_FOUND, "invalid": grpc.StatusCode.FAILED_PRECONDITION,
                "corrupt": grpc.StatusCode.FAILED_PRECONDITION}


@dataclass
class Entry:
    """One version's state on this shard."""

    model: str
    version: str
    state: str  # "LOADING" | "READY" | "UNLOADING" | "FAILED"
    fingerprint: str = ""
    nbytes: int = 0  # reserved while LOADING, mapped once READY, 0 when FAILED
    error: str = ""
    in_flight: int = 0
    loaded: LoadedVersion | None = None
    deltas: VersionDeltas | None = None  # the readable delta states (READY only)
    overlay_bytes: int = 0  # the overlays' memory, reserved while a delta is being applied
    readable_seqs: tuple[int, ...] = (0,)
    applied_seq: int = 0  # the seq most recently made readable

    def copy(self) -> Entry:
        """What callers outside the registry get: the fields, no references to tables."""
        return Entry(**{**vars(self), "loaded": None, "deltas": None})


@dataclass(frozen=True)
class Fit:
    """CheckFit's answer."""

    fits: bool
    required: int
    available: int
    reason: str


class VersionRegistry:
    """Loaded versions of one shard and the lookups running against them."""

    def __init__(self, store: Path, shard: int, num_shards: int, budget: int,
                 readable_seqs: int = 2) -> None:
        self.store, self.shard, self.num_shards, self.budget = store, shard, num_shards, budget
        self.readable_seqs = readable_seqs  # delta states kept readable per version
        self._entries: dict[Key, Entry] = {}
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ lookups

    def hold(self, model: str, version: str, fingerprint: str, seq: int = 0
             ) -> tuple[Entry, LoadedVersion, OverlayState]:
        """Hold a READY version at delta seq `seq` for one lookup (release() the entry after);
        FAILED_PRECONDITION with reason version_not_loaded, fingerprint_mismatch or
        seq_not_applied if it is not servable."""
        with self._cond:
            e = self._entries.get((model, version))
            if e is None or e.state != "READY" or e.loaded is None:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, self._not_ready(model, version, e),
                                   VERSION_NOT_LOADED)
            if fingerprint and fingerprint != e.fingerprint:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {model}/{version} on shard {self.shard} has fingerprint "
                    f"{e.fingerprint}, the request expects {fingerprint}", FINGERPRINT_MISMATCH)
            assert e.deltas is not None  # set with `loaded`
            state = e.deltas.readable.get(seq)
            if state is None:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {model}/{version} on shard {self.shard} cannot be read at delta seq "
                    f"{seq}: readable seqs {list(e.readable_seqs)} (newest applied {e.applied_seq})",
                    SEQ_NOT_APPLIED)
            e.in_flight += 1
            # The mapping and state as of now: a timed-out unload may drop e.loaded, an
            # apply may publish other states; this lookup keeps reading these.
            return e, e.loaded, state

    def release(self, e: Entry) -> None:
        """End a hold(): what UnloadVersion's drain waits for."""
        with self._cond:
            e.in_flight -= 1
            if e.in_flight == 0:
                self._cond.notify_all()

    @contextmanager
    def acquire(self, model: str, version: str, fingerprint: str) -> Iterator[LoadedVersion]:
        """hold() and release() around a block, yielding the mapped version."""
        e, loaded, _ = self.hold(model, version, fingerprint)
        try:
            yield loaded
        finally:
            self.release(e)

    def _not_ready(self, model: str, version: str, e: Entry | None) -> str:
        if e is None:
            ready = sorted(f"{m}/{v}" for (m, v), x in self._entries.items() if x.state == "READY")
            return (f"version {model}/{version} is not loaded on shard {self.shard} of "
                    f"{self.num_shards} (ready: {', '.join(ready) or 'none'})")
        return f"version {model}/{version} is {e.state} on shard {self.shard}, not READY"

    # ------------------------------------------------------------------ admin

    def snapshot(self, model: str = "") -> list[Entry]:
        """Copies of the entries (all, or one model's), sorted by model and version."""
        with self._cond:
            return [e.copy() for k, e in sorted(self._entries.items()) if not model or k[0] == model]

    def used_bytes(self) -> int:
        with self._cond:
            return self._used()

    def _used(self) -> int:
        return sum(e.nbytes + e.overlay_bytes for e in self._entries.values())

    def _plan(self, model: str, version: str) -> VersionPlan:
        try:
            return plan_version(self.store, model, version, self.shard, self.num_shards)
        except StoreError as e:
            raise ServiceError(_STORE_CODES[e.kind], str(e)) from None

    def check_fit(self, model: str, version: str) -> Fit:
        """Would `version` fit the budget now? Reads only its manifest."""
        plan = self._plan(model, version)
        with self._cond:
            e = self._entries.get((model, version))
            if e is not None and e.state in ("READY", "LOADING"):
                return Fit(True, plan.nbytes, self.budget - self._used(), f"already {e.state}")
            available = self.budget - self._used()
        if plan.nbytes <= available:
            return Fit(True, plan.nbytes, available, "")
        return Fit(False, plan.nbytes, available, self._too_big(plan, available))

    def _too_big(self, plan: VersionPlan, available: int) -> str:
        return (f"{plan.model}/{plan.version} needs {plan.nbytes} bytes of tables on shard "
                f"{self.shard}, only {available} of the {self.budget}-byte memory budget are free "
                f"({self.budget - available} used by loaded versions)")

    def load(self, model: str, version: str) -> Entry:
        """Verify and map a version; returns its READY entry or raises ServiceError.

        Idempotent: a READY version is returned as is, a LOADING one is waited for.
        On any failure the entry turns FAILED (visible in ListVersions) and nothing of
        it stays mapped; other versions are never touched.
        """
        plan = self._plan(model, version)
        key = (model, version)
        with self._cond:
            while (e := self._entries.get(key)) is not None and e.state == "LOADING":
                self._cond.wait()
            if e is not None and e.state == "READY":
                return e.copy()
            if e is not None and e.state == "UNLOADING":
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"version {model}/{version} is being unloaded; load it again "
                                   "once UnloadVersion has returned")
            available = self.budget - self._used()
            if plan.nbytes > available:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, self._too_big(plan, available))
            entry = Entry(model, version, "LOADING", plan.manifest.fingerprint, plan.nbytes)
            self._entries[key] = entry
        t0 = time.monotonic()
        try:
            loaded = open_version(plan)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
            with self._cond:
                entry.state, entry.nbytes, entry.error = "FAILED", 0, msg
                self._cond.notify_all()
            log.error("load of %s/%s failed: %s", model, version, msg)
            code = (grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, StoreError)
                    else grpc.StatusCode.INTERNAL)
            raise ServiceError(code, f"load of {model}/{version} refused: {msg}") from None
        deltas = VersionDeltas(plan.directory, plan.manifest, loaded.tables, self.readable_seqs)
        with self._cond:
            entry.state, entry.loaded, entry.nbytes, entry.deltas = "READY", loaded, loaded.nbytes, deltas
            self._cond.notify_all()
            log.info("version %s/%s READY in %.2fs (%d bytes, fingerprint %s)",
                     model, version, time.monotonic() - t0, loaded.nbytes, loaded.fingerprint)
            return entry.copy()

    def unload(self, model: str, version: str, drain_timeout_s: float) -> Entry:
        """Stop new lookups on the version, wait for its in-flight ones, then drop it.

        Returns the final entry: state "" (gone) with in_flight = lookups still running
        when the drain timed out (they finish safely on the still-referenced mapping).
        Unloading a version that is not here succeeds (idempotent rollout steps).
        """
        key = (model, version)
        with self._cond:
            e = self._entries.get(key)
            if e is None:
                return Entry(model, version, "")
            if e.state == "LOADING":
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"version {model}/{version} is still LOADING; unload it once "
                                   "LoadVersion has returned")
            e.state = "UNLOADING"
            deadline = time.monotonic() + drain_timeout_s
            while e.in_flight > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._entries.get(key) is e:
                del self._entries[key]
            # The last in-flight lookup's reference frees the mapping and its overlays.
            e.loaded, e.deltas, e.overlay_bytes = None, None, 0
            if e.in_flight:
                log.warning("unload of %s/%s: drain timed out after %.1fs with %d lookups in flight",
                            model, version, drain_timeout_s, e.in_flight)
            else:
                log.info("version %s/%s unloaded", model, version)
            self._cond.notify_all()
            return Entry(model, version, "", e.fingerprint, 0, e.error, e.in_flight)

    # ------------------------------------------------------------------ deltas

    def apply_deltas(self, model: str, version: str, seq: int, fingerprint: str = ""
                     ) -> tuple[Entry, int]:
        """Make a READY version readable at delta seq `seq`; returns its entry and the rows
        applied (0 when `seq` was readable already: it only becomes the newest again).

        Every delta is verified before anything is built (delta_refused, nothing changed);
        the new state's memory is reserved in the budget first (RESOURCE_EXHAUSTED), then it
        is indexed outside the lock and published by swapping the readable states.
        """
        key = (model, version)
        with self._cond:
            e = self._entries.get(key)
            if e is None or e.state != "READY" or e.deltas is None:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, self._not_ready(model, version, e),
                                   VERSION_NOT_LOADED)
            deltas = e.deltas
        with deltas.lock:
            have = deltas.readable.get(seq)
            if have is not None:
                deltas.check_link(seq, fingerprint, have.link)
                # Re-applying a readable seq makes it the newest again: after a failed gate
                # the controller re-applies s, and the next advance must then drop the
                # state it moved away from, not s, which the rankers read.
                deltas.publish(have)
                with self._cond:
                    e.applied_seq = seq
                    return e.copy(), 0
            t0 = time.monotonic()
            prepared = deltas.prepare(seq, fingerprint)  # reads and verifies: no registry lock
            need = overlay_bytes(prepared.tables, deltas.tables)
            with self._cond:
                if self._entries.get(key) is not e or e.state != "READY":
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       self._not_ready(model, version, self._entries.get(key)),
                                       VERSION_NOT_LOADED)
                available = self.budget - self._used()
                if need > available:
                    raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                        f"{model}/{version} at delta seq {seq} needs an overlay of {need} bytes on "
                        f"shard {self.shard}, only {available} of the {self.budget}-byte memory "
                        f"budget are free (the readable seqs {list(deltas.seqs())} stay)"))
                e.overlay_bytes += need  # reserved while it is indexed
            try:
                state = build_state(seq, prepared.link, prepared.tables, deltas.tables)
            except BaseException:
                with self._cond:
                    e.overlay_bytes -= need
                raise
            with self._cond:  # the reservation becomes the published states' bytes
                if self._entries.get(key) is not e or e.state != "READY":  # unloaded meanwhile
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       self._not_ready(model, version, self._entries.get(key)),
                                       VERSION_NOT_LOADED)
                gone = deltas.publish(state)
                e.overlay_bytes, e.readable_seqs, e.applied_seq = deltas.nbytes, deltas.seqs(), seq
                out = e.copy()
        log.info("%s/%s readable at delta seq %d (from seq %d, %d rows in %.3fs; overlay %d rows, "
                 "%d bytes; readable %s, dropped %s)", model, version, seq, prepared.base_seq,
                 prepared.rows_applied, time.monotonic() - t0, state.num_rows, state.nbytes,
                 list(out.readable_seqs), gone)
        return out, prepared.rows_applied

    def fail(self, model: str, version: str, error: str) -> None:
        """Turn a READY version FAILED (unmapped, its error shown in ListVersions): a
        startup replay that could not reach the committed seq."""
        with self._cond:
            e = self._entries.get((model, version))
            if e is not None and e.state == "READY":  # running lookups keep their references
                e.state, e.error, e.nbytes = "FAILED", error, 0
                e.loaded, e.deltas, e.overlay_bytes = None, None, 0
                e.readable_seqs, e.applied_seq = (), 0
                self._cond.notify_all()

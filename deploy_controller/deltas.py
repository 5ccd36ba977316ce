"""Delta streams: each model's serving version follows its delta directory, seq by seq.

A stream (delta_journal.Stream) pairs a model's serving version with its committed seq.
Every `delta_poll_s` the follower looks at STORE/<model>/<version>/deltas/: the chain
from the committed seq on is verified (modelpack.delta_read; only the deltas not yet
committed are read), and the newest seq that verifies becomes the target of an advance
(delta_runner.py). A delta that fails verification pauses the stream at the last good
seq with the refusal's message; so does a shard's refusal and a failed gate. An operator
can pause, resume, advance (to the newest or a given seq) and revert (to a lower seq:
the stream then stays paused so it does not advance again by itself).

One operation per model at a time: a delta operation and a rollout are exclusive in
the journal (delta_journal.start, journal.create), and a rollout that ends with a new
version serving restarts the stream at that version's seq 0 (journal._restart_stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy_controller.config import ControllerConfig
from deploy_controller.delta_journal import DeltaJournal, DeltaOp, Pause, Stream
from deploy_controller.delta_runner import DeltaRunner
from deploy_controller.errors import ControllerError
from deploy_controller.fleet import Fleet
from deploy_controller.journal import Journal, ModelBusyError
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.recovery import decide_delta
from deploy_controller.tasks import Periodic, Tasks
from modelpack.delta_read import list_seqs, load_delta_manifest, read_delta
from modelpack.manifest import read_manifest
from modelpack.schema import SchemaError, check_name

log = logging.getLogger(__name__)


@dataclass
class Scan:
    """What the store holds past the committed seq."""

    good: int  # the last seq of the verified chain (>= the committed seq)
    newest: int  # the newest seq on disk (0: none)
    error: str | None  # why delta good + 1 was refused (None: every one verified)
    marks: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> fingerprint, written_at


def scan(vdir: Path, committed: int, upto: int | None = None) -> Scan:
    """Verify deltas committed + 1 .. min(upto, newest) of the version in `vdir`, in order."""
    seqs = list_seqs(vdir)
    newest = seqs[-1] if seqs else 0
    last = newest if upto is None else min(upto, newest)
    out = Scan(committed, newest, None)
    try:
        base = read_manifest(vdir)
        prev = (base.fingerprint if committed == 0
                else load_delta_manifest(vdir, committed, base).fingerprint)
        for s in range(committed + 1, last + 1):
            m = read_delta(vdir, s, base=base, prev_fingerprint=prev).manifest
            prev, out.good = m.fingerprint, s
            out.marks[s] = {"fingerprint": m.fingerprint, "written_at": m.written_at}
    except Exception as e:  # DeltaError names the delta; anything else is refused the same
        out.error = str(e)
    return out


def mark(vdir: Path, seq: int) -> dict[str, Any]:
    """Fingerprint and written_at of delta `seq` (seq 0: V itself, nothing to check)."""
    if seq == 0:
        return {"fingerprint": "", "written_at": None}
    m = load_delta_manifest(vdir, seq)
    return {"fingerprint": m.fingerprint, "written_at": m.written_at}


class DeltaStreams:
    def __init__(self, cfg: ControllerConfig, journal: Journal, fleet: Fleet,
                 metrics: ControllerMetrics, lock: Callable[[str], asyncio.Lock],
                 serving: Callable[[str], Awaitable[str]], models: Callable[[], Iterable[str]],
                 publish: Callable[[], object], crash: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.journal = journal
        self.dj = DeltaJournal(journal)
        self.fleet = fleet
        self.metrics = metrics
        self.serving = serving  # model -> the version it serves alone (ControllerError if none)
        self.models = models
        self.runner = DeltaRunner(self.dj, fleet, cfg, metrics, lock, publish, crash)
        self.errors: dict[str, str] = {}  # model -> the follower's last problem
        self._tasks: Tasks[DeltaOp] = Tasks("delta")
        self._loop = Periodic("delta-follow", self.follow_once,
                              cfg.delta_poll_s if self.following else 0.0)
        metrics.freshness_from(lambda: {s.model: s.written_at for s in self.dj.streams()
                                        if s.written_at is not None and s.committed_seq})

    @property
    def following(self) -> bool:
        return self.cfg.delta_poll_s > 0 and self.cfg.store is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Resume (or revert) what a previous process left running; start following."""
        for s in self.dj.streams():
            self.metrics.delta_committed_seq.labels(s.model).set(s.committed_seq)
        for op in self.dj.running():
            d = decide_delta(op, time.time(), self.cfg.max_unsupervised_s)
            log.warning("recovering delta %s %s (%s/%s %d -> %d) at %s: %s", op.kind, op.id,
                        op.model, op.version, op.from_seq, op.to_seq, op.step, d.why)
            self.metrics.recoveries.labels(d.action).inc()
            if d.step is not op.step:
                self.dj.move(op.id, d.step, reason=f"{op.step}: {d.why}", code="resume_unsafe")
            self._spawn(op)
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self._tasks.cancel()

    def _spawn(self, op: DeltaOp) -> None:
        self._tasks.spawn(op.id, self.runner.run(op.id))

    async def wait(self, op_id: str) -> DeltaOp:
        """Until the operation's task ends (however it ends); the operation's row."""
        await self._tasks.wait(op_id)
        op = self.dj.get(op_id)
        if op is None:
            raise ControllerError(404, f"no delta operation {op_id}")
        return op

    # ------------------------------------------------------------------ following

    async def follow_once(self) -> list[DeltaOp]:
        """One look at every model's delta directory; returns the advances it started."""
        started = []
        known = set(self.models()) | {s.model for s in self.dj.streams()}
        for model in sorted(known or await self._ranker_models()):
            if self.dj.running(model) or self.journal.active(model):
                continue
            try:
                st = await self._stream(model)
            except ControllerError as e:
                self.errors[model] = e.message
                continue
            if st.paused:
                continue
            got = await asyncio.to_thread(scan, self._vdir(st), st.committed_seq)
            self.errors.pop(model, None)
            if got.good > st.committed_seq:
                with contextlib.suppress(ControllerError):  # a rollout got there first
                    started.append(self._begin(st, "advance", got.good, got.marks[got.good]))
            elif got.error is not None:
                self._refused(st, got.error)
        return started

    async def _ranker_models(self) -> set[str]:
        """The models the rankers serve: where streams start before any rollout."""
        try:
            topo = await self.fleet.topology()
            got = await asyncio.gather(*(self.fleet.ranker_status(u) for u in topo.rankers),
                                       return_exceptions=True)
        except Exception as e:
            self.errors[""] = f"discovery: {e}"
            return set()
        return {s.model for s in got if not isinstance(s, BaseException)}

    # ------------------------------------------------------------------ operations

    def _vdir(self, st: Stream) -> Path:
        if self.cfg.store is None:
            raise ControllerError(409, "delta operations need the controller's --store")
        return self.cfg.store / st.model / st.version

    async def _stream(self, model: str) -> Stream:
        """The model's stream, following the version it serves now."""
        try:
            check_name("model", model)
        except SchemaError as e:
            raise ControllerError(422, str(e)) from None
        for r in self.journal.active(model):
            raise ControllerError(409, f"model {model!r} has an active rollout {r.id}; delta "
                                  "operations wait until it ends")
        return self.dj.ensure(model, await self.serving(model))

    def _refused(self, st: Stream, error: str) -> None:
        log.warning("delta stream of %s/%s paused at seq %d: %s", st.model, st.version,
                    st.committed_seq, error)
        self.dj.pause(st.model, Pause.REFUSED, error)
        self.metrics.delta_advances.labels("refused").inc()

    def _begin(self, st: Stream, kind: str, to: int, marks: dict[str, Any],
               reason: str = "") -> DeltaOp:
        try:
            op = self.dj.start(st.model, st.version, kind, st.committed_seq, to,
                               {**marks, **({"why": reason} if reason else {})})
        except ModelBusyError as e:
            raise ControllerError(409, str(e)) from None
        log.info("delta %s %s: %s/%s %d -> %d", kind, op.id, st.model, st.version,
                 st.committed_seq, to)
        self._spawn(op)
        return op

    async def advance(self, model: str, to: int | None = None) -> DeltaOp:
        """Advance to `to` (None: the newest seq that verifies)."""
        st = await self._stream(model)
        vdir = self._vdir(st)
        if to is not None and to <= st.committed_seq:
            raise ControllerError(409, f"{model}/{st.version} is at seq {st.committed_seq}; "
                                  + ("already there" if to == st.committed_seq else
                                     f"going back to {to} is `delta revert --to {to}`"))
        got = await asyncio.to_thread(scan, vdir, st.committed_seq, to)
        if to is not None and to > got.newest:
            raise ControllerError(404, f"no delta {to} of {model}/{st.version} in the store "
                                  f"(newest is {got.newest})")
        target = got.good if to is None else to
        if got.good < target or (got.good == st.committed_seq and got.error is not None):
            assert got.error is not None
            self._refused(st, got.error)
            raise ControllerError(409, f"refused, stream paused at seq {got.good}: {got.error}")
        if target == st.committed_seq:
            raise ControllerError(409, f"nothing to advance: {model}/{st.version} is at seq "
                                  f"{st.committed_seq}, the newest on disk is {got.newest}")
        return self._begin(st, "advance", target, got.marks[target])

    async def revert(self, model: str, to: int, reason: str = "") -> DeltaOp:
        """Rankers back to seq `to` once every replica reads it; the stream pauses."""
        st = await self._stream(model)
        if to > st.committed_seq:
            raise ControllerError(409, f"{model}/{st.version} is at seq {st.committed_seq}; "
                                  f"moving forward to {to} is `delta advance --to {to}`")
        try:
            marks = await asyncio.to_thread(mark, self._vdir(st), to)
        except Exception as e:  # DeltaError names the delta
            raise ControllerError(409, f"cannot revert to seq {to}: {e}") from None
        why = f"reverted to seq {to} by operator" + (f": {reason}" if reason else "")
        op = self._begin(st, "revert", to, marks, why)
        self.dj.pause(model, Pause.OPERATOR, why)  # after start: a refused revert pauses nothing
        return op

    async def pause(self, model: str, reason: str = "") -> Stream:
        st = self.dj.stream(model) or await self._stream(model)
        self.dj.pause(model, Pause.OPERATOR, reason or "paused by operator")
        return self.dj.stream(st.model) or st

    async def resume(self, model: str) -> Stream:
        st = self.dj.stream(model) or await self._stream(model)
        self.dj.resume(model)
        return self.dj.stream(st.model) or st

    # ------------------------------------------------------------------ status

    async def status(self, model: str) -> dict[str, Any]:
        st = self.dj.stream(model)
        if st is None:
            try:
                st = await self._stream(model)
            except ControllerError as e:
                raise ControllerError(404 if e.status != 422 else 422,
                                      f"no delta stream of {model}: {e.message}") from None
        running = self.dj.running(model)
        state = ({"advance": "advancing", "revert": "reverting"}[running[0].kind] if running
                 else "paused" if st.paused else "following" if self.following else "manual")
        newest = None
        if self.cfg.store is not None:
            newest = await asyncio.to_thread(lambda: (list_seqs(self._vdir(st)) or [0])[-1])
        lag = (time.time() - st.written_at
               if st.written_at is not None and st.committed_seq else None)
        return {**st.to_json(), "state": state, "newest_seq": newest,
                "target": running[0].to_seq if running else None, "freshness_lag_s": lag,
                "follow_error": self.errors.get(model),
                "operations": [o.to_json() for o in self.dj.recent(model, 5)],
                **await self._fleet_view(st)}

    async def _fleet_view(self, st: Stream) -> dict[str, Any]:
        """Every replica's readable seqs and every ranker's seq of the stream's version."""
        try:
            topo = await self.fleet.topology()
        except Exception as e:
            return {"fleet_error": f"discovery: {e}"}

        async def replica(k: int, addr: str) -> dict[str, Any]:
            row: dict[str, Any] = {"shard": k, "replica": addr}
            try:
                sv = next((v for v in await self.fleet.shard_versions(addr, st.model)
                           if v.version == st.version), None)
            except Exception as e:
                return {**row, "error": str(e)}
            if sv is None:
                return {**row, "error": f"does not hold {st.version}"}
            return {**row, "readable_seqs": list(sv.readable_seqs), "applied_seq": sv.applied_seq,
                    "overlay_bytes": sv.overlay_bytes}

        async def ranker(url: str) -> dict[str, Any] | None:
            try:
                rs = await self.fleet.ranker_status(url)
            except Exception as e:
                return {"ranker": url, "error": str(e)}
            if rs.model != st.model:
                return None
            v = rs.get(st.version)
            return {"ranker": url, **({"seq": v.seq} if v is not None else
                                      {"error": f"does not hold {st.version}"})}

        reps = await asyncio.gather(*(replica(k, a) for k, a in topo.replicas()))
        ranks = await asyncio.gather(*(ranker(u) for u in topo.rankers))
        return {"replicas": list(reps), "rankers": [r for r in ranks if r is not None]}

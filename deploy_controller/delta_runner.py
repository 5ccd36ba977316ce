"""Runs one delta operation through its steps, journaling each before it acts.

    advance s -> t:  apply(t) -> rankers(t) -> gate -> commit     (any failure after
                     rankers moved: revert = rankers back to s, replicas realigned on s)
    revert  c -> r:  apply(r) -> rankers(r) -> commit             (the stream is paused)

The op row names the step to run; every step is idempotent, so the same loop resumes an
operation a crash interrupted (recovery.decide_delta). The gate's baseline scrapes are
journaled before the rankers move, so a resumed gate judges the time spent crashed too.
The runner holds the model's executor lock for the whole operation, so reconcile passes
never move a ranker or replica of that model meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from deploy_controller import delta_steps, steps
from deploy_controller.config import ControllerConfig
from deploy_controller.delta_journal import DeltaJournal, DeltaOp, OpStatus, OpStep, Pause
from deploy_controller.fleet import Fleet
from deploy_controller.gates import Scrape
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.steps import Ctx, StepFailed

log = logging.getLogger(__name__)

REFUSALS = ("delta_refused", "over_budget")  # shard answers that pause the stream


def _outcome(op: DeltaOp, status: OpStatus, code: str) -> str:
    if status is OpStatus.COMMITTED:
        return "reverted" if op.kind == "revert" else "committed"
    if code in REFUSALS:
        return "refused"
    return "gate_failed" if code.startswith("gate_") else "failed"


class DeltaRunner:
    def __init__(self, dj: DeltaJournal, fleet: Fleet, cfg: ControllerConfig,
                 metrics: ControllerMetrics, lock: Callable[[str], asyncio.Lock],
                 publish: Callable[[], object], crash: Callable[[str], None]) -> None:
        self.dj = dj
        self.fleet = fleet
        self.cfg = cfg
        self.metrics = metrics
        self.lock = lock
        self.publish = publish
        self._crash = crash
        self.last_scrape: dict[str, dict[str, Scrape]] = {}  # model -> when its last op ended

    def _hook(self, step: OpStep, event: str) -> None:
        point = f"delta_{step}:{event}"
        if self.cfg.crash_at == point:
            self._crash(point)

    async def run(self, op_id: str) -> DeltaOp:
        op = self.dj.get(op_id)
        assert op is not None
        ctx = Ctx(self.fleet, self.cfg, op.model, op.version, op.version, [100])
        async with self.lock(op.model):
            while op.running:
                await self._step(ctx, op)
                got = self.dj.get(op_id)
                assert got is not None
                op = got
        self.publish()
        log.info("delta %s of %s/%s %d -> %d ended %s%s", op.kind, op.model, op.version,
                 op.from_seq, op.to_seq, op.status, f": {op.reason}" if op.reason else "")
        return op

    async def _step(self, ctx: Ctx, op: DeltaOp) -> None:
        step = op.step
        try:
            if step is OpStep.APPLY:
                self._begin(op, step)
                await delta_steps.apply(ctx, op.version, op.to_seq,
                                        str(op.detail.get("fingerprint", "")), keep=op.from_seq)
                self._next(op, step, OpStep.RANKERS)
            elif step is OpStep.RANKERS:
                self._begin(op, step, await self._baseline(ctx, op))
                await delta_steps.set_rankers(ctx, op.version, op.to_seq,
                                              str(op.detail.get("fingerprint", "")))
                gated = op.kind == "advance" and self.cfg.delta_gate_s > 0
                self._next(op, step, OpStep.GATE if gated else OpStep.COMMIT)
            elif step is OpStep.GATE:
                started = float(op.detail.get("gate_started_at") or time.time())
                self._begin(op, step, {"gate_started_at": started})
                await steps.discover(ctx)
                await delta_steps.gate(
                    ctx, op.version, op.from_seq, op.to_seq, Scrape.from_json(op.detail["prev"]),
                    {u: Scrape.from_json(s) for u, s in op.detail["baseline"].items()}, started)
                self._next(op, step, OpStep.COMMIT)
            elif step is OpStep.COMMIT:
                self._begin(op, step)
                self._finish(op, OpStatus.COMMITTED)
                await self._remember(ctx, op.model)
            elif step is OpStep.REVERT:
                self._begin(op, step)
                await delta_steps.set_rankers(ctx, op.version, op.from_seq)
                await delta_steps.apply(ctx, op.version, op.from_seq, "", keep=op.from_seq)
                kind = Pause.GATE if op.reason_code.startswith("gate_") else Pause.FAILED
                self._finish(op, OpStatus.ROLLED_BACK, pause=(kind, op.reason))
                await self._remember(ctx, op.model)
        except StepFailed as e:
            self._failed(op, step, e.code, e.message)
        except Exception as e:  # a bug must end the operation, not leave it hanging
            log.exception("delta %s: %s raised", op.id, step)
            self._failed(op, step, "internal", f"{type(e).__name__}: {e}")

    def _begin(self, op: DeltaOp, step: OpStep, detail: dict[str, Any] | None = None) -> None:
        self.dj.begin(op.id, step, detail)
        self._hook(step, "begin")
        log.info("delta %s %s/%s %d -> %d: %s begins", op.kind, op.model, op.version,
                 op.from_seq, op.to_seq, step)

    def _next(self, op: DeltaOp, step: OpStep, nxt: OpStep, reason: str = "",
              code: str = "") -> None:
        self.dj.move(op.id, nxt, reason=reason, code=code)
        self._hook(step, "end")

    def _finish(self, op: DeltaOp, status: OpStatus, *, reason: str = "", code: str = "",
                pause: tuple[Pause, str] | None = None) -> None:
        written = op.detail.get("written_at")
        self.dj.finish(op, status, reason=reason, code=code, pause=pause,
                       written_at=float(written) if written is not None else None)
        self._hook(op.step, "end")
        code = code or op.reason_code
        self.metrics.delta_advances.labels(_outcome(op, status, code)).inc()
        if status is OpStatus.COMMITTED:
            self.metrics.delta_committed_seq.labels(op.model).set(op.to_seq)

    def _failed(self, op: DeltaOp, step: OpStep, code: str, message: str) -> None:
        reason = f"{step}: {message}"
        log.warning("delta %s of %s/%s %d -> %d: %s", op.kind, op.model, op.version,
                    op.from_seq, op.to_seq, reason)
        if step is OpStep.APPLY or (op.kind == "revert" and step is OpStep.RANKERS):
            # Rankers untouched (or, for a revert, the stream stays paused at the committed
            # seq and reconcile brings any moved ranker back to it).
            pause = (Pause.REFUSED, reason) if code in REFUSALS else None
            self._finish(op, OpStatus.FAILED, reason=reason, code=code, pause=pause)
        elif step in (OpStep.RANKERS, OpStep.GATE):
            self._next(op, step, OpStep.REVERT, reason=reason, code=code)
        else:
            self._finish(op, OpStatus.FAILED, reason=reason, code=code,
                         pause=(Pause.FAILED, f"{op.reason}; then {reason}" if op.reason
                                else reason))

    async def _baseline(self, ctx: Ctx, op: DeltaOp) -> dict[str, Any]:
        """Before rankers move: their scrapes (the gate's baseline) and what the previous
        seq served (its old side). Kept from the journal when the step is re-run."""
        if op.kind != "advance" or self.cfg.delta_gate_s <= 0 or "baseline" in op.detail:
            return {}
        await steps.discover(ctx)
        now = await steps.scrape_rankers(ctx)
        prev = delta_steps.previous(self.last_scrape.get(op.model, {}), now, op.version,
                                    self.cfg.gates.min_requests)
        return {"baseline": {u: s.to_json() for u, s in now.items()}, "prev": prev.to_json()}

    async def _remember(self, ctx: Ctx, model: str) -> None:
        """The rankers' scrapes as the operation ends: the next gate's previous window."""
        try:
            await steps.discover(ctx)
            self.last_scrape[model] = await steps.scrape_rankers(ctx)
        except StepFailed as e:
            log.warning("delta: no scrape after the operation on %s: %s", model, e.message)

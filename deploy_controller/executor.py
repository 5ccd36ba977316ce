"""Drives one rollout through the state machine, journaling each step before and after.

The loop is: read the rollout's current step from the journal, write `begin`, act,
write `end` + the next step (one transaction), repeat until a terminal step. Because
the journal row is the only source of truth, the same loop resumes a rollout that a
crash interrupted. An abort is persisted first and then signalled, so it survives a
restart; it stops phase 1/2 steps between server calls (and a bake at once), and is
refused by the API in phase 3 (see state.abortable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deploy_controller import bluegreen_steps, steps
from deploy_controller.config import ControllerConfig
from deploy_controller.desired import DesiredPublisher
from deploy_controller.fleet import Fleet
from deploy_controller.gates import (
    GateFailure,
    GateResult,
    GateTracker,
    Scrape,
    Verdict,
    evaluate,
)
from deploy_controller.journal import Journal, Rollout
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.state import Kind, Outcome, Phase, Step, abortable, next_step
from deploy_controller.steps import Aborted, Ctx, StepFailed

log = logging.getLogger(__name__)

_ACTIONS: dict[Kind, Callable[[Ctx], Awaitable[dict[str, Any]]]] = {
    Kind.LOAD_DENSE: steps.load_dense,
    Kind.CHECK_FIT: steps.check_fit,
    Kind.LOAD_EMBEDDINGS: steps.load_embeddings,
    Kind.PREPARE: steps.prepare,
    Kind.UNLOAD_OLD_RANKERS: steps.unload_old_rankers,
    Kind.UNLOAD_OLD_SHARDS: steps.unload_old_shards,
    Kind.ROLLBACK_TRAFFIC: steps.rollback_traffic,
    Kind.UNLOAD_NEW_RANKERS: steps.unload_new_rankers,
    Kind.UNLOAD_NEW_SHARDS: steps.unload_new_shards,
    Kind.CHECK_PLAN: bluegreen_steps.check_plan,
    Kind.CONVERT_REST: bluegreen_steps.convert_rest,
    Kind.REVERT_REPLICAS: bluegreen_steps.revert_replicas,
}


def _sigkill(point: str) -> None:
    log.critical("crash_at=%s reached: killing this process (test hook)", point)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Run:
    ctx: Ctx
    abort_reason: str = ""
    view: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)


class Executor:
    def __init__(self, journal: Journal, fleet: Fleet, cfg: ControllerConfig,
                 metrics: ControllerMetrics | None = None,
                 crash: Callable[[str], None] = _sigkill,
                 publisher: DesiredPublisher | None = None) -> None:
        self.journal = journal
        self.fleet = fleet
        self.cfg = cfg
        self.metrics = metrics or ControllerMetrics()
        self.publisher = publisher
        self._crash = crash
        self._runs: dict[str, _Run] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, model: str) -> asyncio.Lock:
        """Held while a step acts on the model's servers (reconcile.py waits for it)."""
        return self._locks.setdefault(model, asyncio.Lock())

    def progress(self, rollout_id: str) -> dict[str, Any]:
        """Live view of a running rollout: servers' states and the last gate evaluation."""
        run = self._runs.get(rollout_id)
        return {} if run is None else {"fleet": run.view, "gate": run.gate}

    def signal_abort(self, rollout_id: str, reason: str) -> None:
        """Wake a running rollout after its abort was persisted (Controller.abort)."""
        run = self._runs.get(rollout_id)
        if run is not None:
            run.abort_reason = reason
            run.ctx.abort.set()

    async def run(self, rollout_id: str) -> Rollout:
        r = self.journal.get(rollout_id)
        if r is None:
            raise KeyError(rollout_id)
        ctx = Ctx(self.fleet, self.cfg, r.model, r.from_version, r.to_version, r.canary,
                  plan=r.plan)
        run = self._runs[rollout_id] = _Run(ctx)
        if r.abort_requested:
            ctx.abort.set()
            run.abort_reason = next((e.detail.get("reason", "") for e in reversed(r.events)
                                     if e.event == "abort"), "")
        try:
            while not r.step.terminal:
                self.metrics.set_phase(r.model, r.step.phase)
                if r.step.kind is Kind.BAKE:  # watches only: reconciling may repair meanwhile
                    await self._step(run, r)
                else:
                    async with self.lock(r.model):
                        await self._step(run, r)
                if self.publisher is not None:
                    self.publisher.publish()
                got = self.journal.get(rollout_id)
                assert got is not None
                r = got
        finally:
            self._runs.pop(rollout_id, None)
        self.metrics.set_phase(r.model, None)
        self.metrics.rollouts.labels(str(r.status)).inc()
        log.info("rollout %s of %s %s -> %s ended %s%s", r.id, r.model, r.from_version,
                 r.to_version, r.status, f": {r.reason}" if r.reason else "")
        return r

    def crash(self, point: str) -> None:
        """The crash_at test hook's action (SIGKILL in production)."""
        self._crash(point)

    def _hook(self, step: Step, event: str) -> None:
        point = f"{step.name}:{event}"
        if self.cfg.crash_at == point:
            self._crash(point)

    async def _step(self, run: _Run, r: Rollout) -> None:
        step, ctx = r.step, run.ctx
        ctx.abortable = abortable(step)
        if ctx.abortable and ctx.abort.is_set():
            self._end(r, step, Outcome.ABORTED, "abort", self._abort_message(run), {})
            return
        last = r.events[-1] if r.events else None
        resumed = last is not None and last.step == step.name and last.event in ("begin",
                                                                                   "resume")
        outcome, code, reason, detail = Outcome.OK, "", "", {}
        begin: dict[str, Any] = {}
        baseline: dict[str, Scrape] = {}
        started = time.time()
        t0 = time.monotonic()
        try:
            if step.kind is Kind.BAKE:
                baseline, started = await self._baseline(ctx, r, step, resumed)
                begin = {"baseline": {u: s.to_json() for u, s in baseline.items()},
                         "bake_s": r.bake_s, "share": r.canary[step.index],
                         "started_at": started}
        except StepFailed as e:
            outcome, code, reason = Outcome.FAILED, e.code, e.message
        self.journal.begin(r.id, step, begin)
        self._hook(step, "begin")
        log.info("rollout %s: %s begins%s", r.id, step.name, " (resumed)" if resumed else "")
        try:
            if outcome is not Outcome.OK:
                pass  # the bake's baseline could not be taken
            elif step.kind is Kind.SHIFT:
                detail = await (bluegreen_steps.shift if ctx.blue_green else steps.shift)(
                    ctx, step.index)
            elif step.kind is Kind.CONVERT:
                detail = await bluegreen_steps.convert(ctx, step.index)
            elif step.kind is Kind.PREPARE and ctx.blue_green:
                detail = await bluegreen_steps.prepare(ctx)
            elif step.kind is Kind.BAKE:
                detail = await self._bake(run, r, baseline, started)
            else:
                detail = await _ACTIONS[step.kind](ctx)
            ctx.check_abort()  # an abort that came during the step's last call
        except Aborted:
            outcome, code, reason = Outcome.ABORTED, "abort", self._abort_message(run)
        except StepFailed as e:
            outcome, code, reason = Outcome.FAILED, e.code, e.message
        except Exception as e:  # a bug must roll back, not leave the rollout hanging
            log.exception("rollout %s: %s raised", r.id, step.name)
            outcome, code, reason = Outcome.FAILED, "internal", f"{type(e).__name__}: {e}"
        self.metrics.step_duration.labels(str(step.kind), str(outcome)).observe(
            time.monotonic() - t0)
        if reason:
            log.warning("rollout %s: %s %s: %s", r.id, step.name, outcome, reason)
            reason = f"{step.name}: {reason}"
        self._end(r, step, outcome, code, reason, detail)
        run.view = await steps.snapshot(ctx)

    def _end(self, r: Rollout, step: Step, outcome: Outcome, code: str, reason: str,
             detail: dict[str, Any]) -> None:
        nxt = next_step(step, outcome, r.canary, r.path)
        if nxt.phase is Phase.ROLLBACK and step.phase is not Phase.ROLLBACK:
            self.metrics.rollbacks.labels(code or "unknown").inc()
        self.journal.end(r.id, step, outcome, nxt, reason=reason, reason_code=code,
                         detail=detail)
        self._hook(step, "end")

    @staticmethod
    def _abort_message(run: _Run) -> str:
        return "aborted by operator" + (f": {run.abort_reason}" if run.abort_reason else "")

    async def _baseline(self, ctx: Ctx, r: Rollout, step: Step, resumed: bool
                        ) -> tuple[dict[str, Scrape], float]:
        """The scrape a bake's window starts from, and when the bake started."""
        await steps.discover(ctx)
        prior = next((e for e in reversed(r.events)
                      if e.step == step.name and e.event == "begin"), None)
        if resumed and prior is not None and "baseline" in prior.detail:
            # Resume the interrupted bake: same window, only the time that is left.
            return ({u: Scrape.from_json(s) for u, s in prior.detail["baseline"].items()},
                    float(prior.detail.get("started_at", prior.ts)))
        return await steps.scrape_rankers(ctx), time.time()

    async def _evaluate(self, ctx: Ctx, baseline: dict[str, Scrape]
                        ) -> tuple[GateResult, dict[str, Scrape]]:
        """Judge the interval since `baseline`; returns the result and the new scrapes."""
        try:
            now = await steps.scrape_rankers(ctx)
        except StepFailed as e:
            return GateResult((GateFailure("metrics_unavailable", e.message),), {}), baseline
        urls = list(now)
        result = evaluate([baseline.get(u, Scrape()) for u in urls], [now[u] for u in urls],
                          ctx.old, ctx.new, self.cfg.gates)
        return result, now

    async def _bake(self, run: _Run, r: Rollout, baseline: dict[str, Scrape],
                    started: float) -> dict[str, Any]:
        ctx = run.ctx
        tracker = GateTracker(self.cfg.gate_fail_after, self.cfg.gate_max_failures)
        deadline = started + r.bake_s
        while True:
            left = deadline - time.time()
            wait = min(self.cfg.gate_interval_s, left) if left > 0 else (
                0.0 if tracker.evaluations == 0 else self.cfg.gate_interval_s)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.abort.wait(), wait)
            ctx.check_abort()
            # Each evaluation judges the interval since the previous one, so one bad
            # interval is a blip rather than a stain on every later window; the first
            # interval starts at the journaled baseline, so time spent crashed is judged.
            result, baseline = await self._evaluate(ctx, baseline)
            run.gate = {"ok": result.ok, "failures": [f.message for f in result.failures],
                        **result.detail}
            verdict = tracker.record(result)
            self.metrics.gate_evaluations.labels("pass" if result.ok else "fail").inc()
            if verdict == Verdict.FAIL:
                code, message = tracker.reason()
                raise StepFailed(code, message)
            if verdict == Verdict.PASS and time.time() >= deadline:
                return {"evaluations": tracker.evaluations, "failures": tracker.failures,
                        "gate": result.detail}

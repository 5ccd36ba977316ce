"""What to do, on restart, with the rollouts a crash left active in the journal.

The journal row names the current step; the last event says whether it had begun.
Which direction is safe depends on where the rollout stood:

- rolling back: go on rolling back. Every rollback step is idempotent and the old
  version was never unloaded, so this is always safe, and the only way back to a
  consistent fleet.
- retire (phase 3): go on retiring. The old version may already be gone from some
  rankers, so rolling back would need it reloaded; forward is the only safe way. The
  new version already serves all traffic and passed every gate.
- an abort was requested before the crash: roll back, as the operator asked.
- phase 2 with canary traffic possibly on the new version (a SHIFT had begun): if
  the controller was down longer than `max_unsupervised_s`, roll back. The canary ran
  with no gate watching for longer than any bake was meant to last; promoting it on
  a window nobody judged is unsafe.
- otherwise resume: re-run the interrupted step or start the next one. Stage/prepare/
  shift steps are idempotent (they ask only for what is missing); an interrupted
  BAKE resumes over the same window (its baseline scrape was journaled in its begin
  event), so nothing that happened while the controller was down goes unjudged.

A blue/green rollout (bluegreen.py) follows the same rules: its `convert` steps are
phase 2 (resumed, or rolled back with the canary rule), `convert_rest` is retire (only
forward), `revert_replicas` is rollback; its journaled path says what comes next.

Delta operations (decide_delta) resume their step: every one is idempotent. One whose
rankers may already read the new seq (its rankers step had begun) is reverted instead
when the controller was down longer than `max_unsupervised_s`, as a canary is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from deploy_controller.delta_journal import DeltaOp, OpStep
from deploy_controller.journal import Journal, Rollout
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.state import Kind, Outcome, Phase, Status, next_step

log = logging.getLogger(__name__)

RESUME = "resume"
ROLLBACK = "rollback"


@dataclass(frozen=True)
class Decision:
    action: str  # resume | rollback
    why: str
    interrupted: bool  # the current step had begun but not ended


def _canary_started(r: Rollout) -> bool:
    """Whether any SHIFT step of this rollout has begun (new version may carry traffic)."""
    return any(e.event == "begin" and e.step.startswith(str(Kind.SHIFT)) for e in r.events)


def decide(r: Rollout, now: float, max_unsupervised_s: float) -> Decision:
    step_events = [e for e in r.events if e.event in ("begin", "end")]
    last = step_events[-1] if step_events else None
    interrupted = last is not None and last.event == "begin" and last.step == r.step.name
    if r.status is Status.ROLLING_BACK:
        return Decision(RESUME, "rolling back: rollback steps are idempotent", interrupted)
    if r.step.phase is Phase.RETIRE:
        return Decision(RESUME, "retiring: the old version may be partly unloaded, so only "
                        "forward is safe", interrupted)
    if r.abort_requested:
        return Decision(ROLLBACK, "an abort was requested before the controller stopped",
                        interrupted)
    down_s = now - (r.events[-1].ts if r.events else r.updated_at)
    if _canary_started(r) and down_s > max_unsupervised_s:
        return Decision(ROLLBACK, f"canary traffic ran unsupervised for {down_s:.0f} s "
                        f"(> {max_unsupervised_s:g} s) while the controller was down",
                        interrupted)
    what = f"re-running interrupted {r.step.name}" if interrupted else f"starting {r.step.name}"
    return Decision(RESUME, f"{what}: phase 1/2 steps are idempotent", interrupted)


@dataclass(frozen=True)
class DeltaDecision:
    action: str  # resume | rollback
    why: str
    step: OpStep  # the step to run on


def decide_delta(op: DeltaOp, now: float, max_unsupervised_s: float) -> DeltaDecision:
    """A delta operation left running: resume its step (all are idempotent), unless
    rankers may have read the new seq with no gate watching for longer than
    `max_unsupervised_s` (an advance whose rankers step had begun): then revert them."""
    down_s = now - op.updated_at
    moved = op.kind == "advance" and op.detail.get("began") in (OpStep.RANKERS, OpStep.GATE)
    if moved and op.step in (OpStep.RANKERS, OpStep.GATE) and down_s > max_unsupervised_s:
        return DeltaDecision(ROLLBACK, f"rankers may have read seq {op.to_seq} unsupervised "
                             f"for {down_s:.0f} s (> {max_unsupervised_s:g} s) while the "
                             "controller was down", OpStep.REVERT)
    return DeltaDecision(RESUME, f"re-running {op.step}: delta steps are idempotent", op.step)


def recover(journal: Journal, now: float, max_unsupervised_s: float,
            metrics: ControllerMetrics | None = None) -> list[tuple[str, Decision]]:
    """Journal a decision for every active rollout; returns (id, decision) to run on.

    A rollback decision is journaled as the current step ending FAILED with reason
    code `resume_unsafe`, so it follows the same table row as any other failure.
    """
    out = []
    for r in journal.active():
        d = decide(r, now, max_unsupervised_s)
        log.warning("recovering rollout %s (%s %s -> %s) at %s: %s (%s)", r.id, r.model,
                    r.from_version, r.to_version, r.step.name, d.action, d.why)
        journal.note(r.id, r.step, "recover",
                     {"decision": d.action, "why": d.why, "interrupted": d.interrupted})
        if metrics is not None:
            metrics.recoveries.labels(d.action).inc()
        if d.action == ROLLBACK:
            code = "abort" if r.abort_requested else "resume_unsafe"
            nxt = next_step(r.step, Outcome.FAILED, r.canary, r.path)
            journal.end(r.id, r.step, Outcome.FAILED, nxt, reason_code=code,
                        reason=f"{r.step.name}: controller restarted: {d.why}")
            if metrics is not None:
                metrics.rollbacks.labels(code).inc()
        else:
            journal.note(r.id, r.step, "resume", {"why": d.why})
        out.append((r.id, d))
    return out

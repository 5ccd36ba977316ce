"""Crash safety: a controller killed at every journal write resumes or rolls back, and the
fleet always ends on exactly one fully prepared version."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from deploy_controller.executor import Executor
from deploy_controller.journal import Journal
from deploy_controller.recovery import RESUME, ROLLBACK, decide, recover
from deploy_controller.state import Kind, Outcome, Status, Step, plan
from tests.unit.controller_helpers import Harness, MakeHarness, assert_serving_only


class SimulatedCrash(BaseException):
    """Stands in for SIGKILL: escapes every handler, leaves the journal as written."""


def _crash(point: str) -> None:
    raise SimulatedCrash(point)


CANARY = [50, 100]
POINTS = [f"{s.name}:{ev}" for s in plan(CANARY)[:-1] for ev in ("begin", "end")]


def _crash_then_recover(h: Harness, point: str, *, bake_s: float = 0.02,
                        downtime_s: float = 0.0) -> tuple[str, str]:
    h.executor.cfg = replace(h.cfg, crash_at=point)
    h.executor._crash = _crash
    r = h.start(CANARY, bake_s=bake_s)
    with pytest.raises(SimulatedCrash):
        h.run(r)
    # A fresh process: new journal handle, new executor, same fleet.
    journal = Journal(h.journal.path)
    ex = Executor(journal, h.fleet, h.cfg)
    h.journal = journal
    decisions = recover(journal, time.time() + downtime_s, h.cfg.max_unsupervised_s)
    if not decisions:  # the crash came after the last step's end: nothing left to do
        got = journal.get(r.id)
        assert got is not None and not got.active
        return "none", str(got.status)
    (rid, decision), = decisions
    assert rid == r.id
    final = asyncio.run(ex.run(rid))
    return decision.action, str(final.status)


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_step_boundary_resumes_to_success(make_harness: MakeHarness, point: str) -> None:
    h = make_harness()
    action, status = _crash_then_recover(h, point)
    assert action == (RESUME if point != "unload_old_shards:end" else "none")
    assert status == Status.SUCCEEDED
    assert_serving_only(h, "v2", gone="v1")
    (r,) = h.journal.history()
    if action == "none":
        return
    events = h.journal.events(r.id)
    assert any(e.event == "recover" for e in events)
    assert any(e.event == "resume" for e in events)


@pytest.mark.parametrize("point", [p for p in POINTS if p.startswith(("shift", "bake"))
                                   and p != "bake:1:end"])
def test_long_unsupervised_canary_rolls_back(make_harness: MakeHarness, point: str) -> None:
    h = make_harness(max_unsupervised_s=60.0)
    action, status = _crash_then_recover(h, point, downtime_s=3600)
    assert (action, status) == (ROLLBACK, Status.ROLLED_BACK)
    (r,) = h.journal.history()
    assert r.reason_code == "resume_unsafe" and "unsupervised" in r.reason
    assert_serving_only(h, "v1", gone="v2")


@pytest.mark.parametrize("point", ["load_dense:end", "check_fit:begin", "prepare:end"])
def test_long_downtime_before_any_canary_still_resumes(make_harness: MakeHarness, point: str) -> None:
    h = make_harness(max_unsupervised_s=60.0)
    assert _crash_then_recover(h, point, downtime_s=3600) == (RESUME, Status.SUCCEEDED)


@pytest.mark.parametrize("point", ["rollback_traffic:begin", "rollback_traffic:end",
                                   "unload_new_rankers:begin", "unload_new_shards:begin",
                                   "unload_new_shards:end"])
def test_crash_while_rolling_back_finishes_the_rollback(make_harness: MakeHarness, point: str) -> None:
    h = make_harness()
    h.fleet.behavior["v2"].error_rate = 0.9
    action, status = _crash_then_recover(h, point, downtime_s=3600)
    want = "none" if point == "unload_new_shards:end" else RESUME
    assert (action, status) == (want, Status.ROLLED_BACK)
    assert_serving_only(h, "v1", gone="v2")


def test_last_gate_passed_then_long_crash_retires_forward(make_harness: MakeHarness) -> None:
    h = make_harness(max_unsupervised_s=60.0)
    assert _crash_then_recover(h, "bake:1:end", downtime_s=3600) == (RESUME, Status.SUCCEEDED)
    assert_serving_only(h, "v2", gone="v1")


def test_crash_after_abort_request_rolls_back(make_harness: MakeHarness) -> None:
    h = make_harness()
    r = h.start(CANARY)
    h.journal.request_abort(r.id, "operator")
    (rid, d), = recover(h.journal, time.time(), 300)
    assert d.action == ROLLBACK
    final = asyncio.run(h.executor.run(rid))
    assert final.status is Status.ROLLED_BACK and final.reason_code == "abort"


def test_interrupted_bake_keeps_its_window(make_harness: MakeHarness) -> None:
    """Errors served while the controller was down are judged after the restart."""
    h = make_harness()
    h.executor.cfg = replace(h.cfg, crash_at="bake:0:begin")
    h.executor._crash = _crash
    r = h.start(CANARY, bake_s=0.05)
    with pytest.raises(SimulatedCrash):
        h.run(r)
    begin = [e for e in h.journal.events(r.id) if e.event == "begin"][-1]
    assert begin.step == "bake:0" and "baseline" in begin.detail
    h.fleet.behavior["v2"].error_rate = 0.5  # bad while nobody watched
    recover(h.journal, time.time(), 300)
    h.executor.cfg = h.cfg
    final = asyncio.run(h.executor.run(r.id))
    assert final.status is Status.ROLLED_BACK and final.reason_code.startswith("gate_")


def _rollout_at(h: Harness, step: Step, *, begun: bool, status: Status = Status.RUNNING
                ) -> None:
    r = h.start(CANARY)
    for s in plan(CANARY):
        if s == step:
            break
        h.journal.begin(r.id, s)
        h.journal.end(r.id, s, Outcome.OK, s if s.terminal else _next(s))
    if status is Status.ROLLING_BACK:
        h.journal.end(r.id, step, Outcome.FAILED, Step(Kind.ROLLBACK_TRAFFIC))
        step = Step(Kind.ROLLBACK_TRAFFIC)
    if begun:
        h.journal.begin(r.id, step)


def _next(s: Step) -> Step:
    p = plan(CANARY)
    return p[p.index(s) + 1]


@pytest.mark.parametrize(("step", "begun", "status", "downtime", "action"), [
    (Step(Kind.LOAD_DENSE), True, Status.RUNNING, 0, RESUME),
    (Step(Kind.PREPARE), False, Status.RUNNING, 9999, RESUME),
    (Step(Kind.SHIFT, 0), True, Status.RUNNING, 0, RESUME),
    (Step(Kind.SHIFT, 0), True, Status.RUNNING, 9999, ROLLBACK),
    (Step(Kind.BAKE, 1), False, Status.RUNNING, 9999, ROLLBACK),
    (Step(Kind.UNLOAD_OLD_RANKERS), True, Status.RUNNING, 9999, RESUME),
    (Step(Kind.UNLOAD_OLD_SHARDS), False, Status.RUNNING, 9999, RESUME),
    (Step(Kind.BAKE, 0), True, Status.ROLLING_BACK, 9999, RESUME),
])
def test_decide_table(make_harness: MakeHarness, step: Step, begun: bool, status: Status,
                      downtime: float, action: str) -> None:
    h = make_harness()
    _rollout_at(h, step, begun=begun, status=status)
    (r,) = h.journal.active()
    d = decide(r, time.time() + downtime, max_unsupervised_s=300)
    assert d.action == action, d.why
    assert d.interrupted == begun

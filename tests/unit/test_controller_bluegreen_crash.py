"""Blue/green crash safety and convergence: a controller killed at every journal write of
the plan (and of its way back) resumes or rolls back to all-old or all-new; the desired
state and the reconcile loop follow what the plan has each replica hold; the API shows
the plan before anything starts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy_controller import bluegreen
from deploy_controller.app import build_app
from deploy_controller.desired import replica_holds, target
from deploy_controller.executor import Executor
from deploy_controller.fake import FakeFleet
from deploy_controller.journal import Journal
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.reconcile import Reconciler
from deploy_controller.recovery import recover
from deploy_controller.state import Outcome, Status, Step
from modelpack.desired import DesiredModel
from tests.unit.controller_helpers import (
    AUTH,
    Harness,
    MakeConfig,
    assert_all_on,
    blue_green_harness,
    start_blue_green,
    wait_done,
)

CANARY = [50, 100]
PATH = bluegreen.blue_green((("a", "b"),), CANARY, "v1", "v2", 2.0, "").steps
POINTS = [f"{s}:{ev}" for s in PATH[:-1] for ev in ("begin", "end")]
# The way back: a crash as each rollback step begins (their ends are the next ones' begins).
BACK = ["rollback_traffic:begin", "unload_new_rankers:begin", "revert_replicas:begin"]


class SimulatedCrash(BaseException):
    """Stands in for SIGKILL: escapes every handler, leaves the journal as written."""


def _crash(point: str) -> None:
    raise SimulatedCrash(point)


def _crash_then_recover(h: Harness, point: str, downtime_s: float = 0.0) -> Status:
    h.executor.cfg = replace(h.cfg, crash_at=point)
    h.executor._crash = _crash
    r = start_blue_green(h, CANARY, bake_s=0.02)
    with pytest.raises(SimulatedCrash):
        h.run(r)
    journal = Journal(h.journal.path)  # a fresh process: new handle, new executor
    h.journal = journal
    decisions = recover(journal, time.time() + downtime_s, h.cfg.max_unsupervised_s)
    for rid, _ in decisions:
        asyncio.run(Executor(journal, h.fleet, h.cfg).run(rid))
    got = journal.get(r.id)
    assert got is not None and not got.active
    return got.status


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_every_step_boundary_ends_all_new(tmp_path: Path, point: str) -> None:
    h = blue_green_harness(tmp_path)
    assert _crash_then_recover(h, point) is Status.SUCCEEDED
    assert_all_on(h, "v2", gone="v1")


@pytest.mark.parametrize("point", ["shift:0:begin", "bake:1:begin"])
def test_long_unsupervised_canary_ends_all_old(tmp_path: Path, point: str) -> None:
    h = blue_green_harness(tmp_path, max_unsupervised_s=60.0)
    assert _crash_then_recover(h, point, downtime_s=3600) is Status.ROLLED_BACK
    assert_all_on(h, "v1", gone="v2")


@pytest.mark.parametrize("point", BACK)
def test_crash_while_rolling_back_ends_all_old(tmp_path: Path, point: str) -> None:
    h = blue_green_harness(tmp_path)
    h.fleet.behavior["v2"].error_rate = 0.9
    assert _crash_then_recover(h, point) is Status.ROLLED_BACK
    assert_all_on(h, "v1", gone="v2")


def test_crash_between_unload_and_load_of_a_replica(tmp_path: Path) -> None:
    """SIGKILL after a replica dropped v1 but before it loaded v2: it holds nothing; the
    resumed convert loads v2 there (no second unload, no breach)."""
    h = blue_green_harness(tmp_path)
    hit = {"n": 0}

    def kill_after_unload(op: str, server: str) -> None:
        if op == "shard_load" and server == "shard-0-0:50051" and not hit["n"]:
            hit["n"] = 1
            raise SimulatedCrash("between unload and load")

    h.fleet.hooks.append(kill_after_unload)
    r = start_blue_green(h, CANARY)
    with pytest.raises(SimulatedCrash):
        h.run(r)
    assert h.fleet.shards["shard-0-0:50051"] == {}
    recover(h.journal, time.time(), 300)
    assert asyncio.run(h.executor.run(r.id)).status is Status.SUCCEEDED
    assert_all_on(h, "v2", gone="v1")


def test_desired_state_and_replica_holds_follow_the_plan(tmp_path: Path) -> None:
    h = blue_green_harness(tmp_path)
    r = start_blue_green(h, CANARY)
    seen = {}
    for name in PATH[:-1]:
        got = h.journal.get(r.id)
        assert got is not None
        seen[name] = (target(got), replica_holds(got))
        h.journal.end(r.id, Step.parse(name), Outcome.OK, Step.parse(PATH[PATH.index(name) + 1]))
    assert seen["convert:0"][0] == ("v1", ("v1",), {"v1": 1.0})
    assert seen["prepare"][0] == ("v1", ("v1", "v2"), {"v1": 1.0})
    assert seen["bake:0"][0][2] == {"v1": 0.5, "v2": 0.5}
    assert seen["convert_rest"][0] == ("v2", ("v2",), {"v2": 1.0})
    holds = seen["prepare"][1]
    assert holds is not None and holds["shard-0-0:50051"] == ("v2",)
    assert holds["shard-0-1:50051"] == ("v1",)


def test_reconcile_converts_a_replica_back_to_the_plan(tmp_path: Path) -> None:
    """The plan has wave 0 on v2; shard-1-0 came back from a restart with v1 (the desired
    state's active version): it is converted, as v1 stays on shard-1-1. shard-0-1 holds
    the only v2 of shard 0 where the plan wants v1: that one is left alone."""
    fleet = FakeFleet(routing=True, budget_bytes=150)
    fleet.shards["shard-0-1:50051"] = {"v2": fleet._shard_version("v2")}
    fleet.shards["shard-0-0:50051"] = {"v1": fleet._shard_version("v1")}
    plan: dict[str, tuple[str, ...]] = {"shard-0-0:50051": ("v2",), "shard-0-1:50051": ("v1",),
            "shard-1-0:50051": ("v2",), "shard-1-1:50051": ("v1",)}
    want = {"m": DesiredModel("v1", ("v1", "v2"), {"v1": 1.0})}
    rec = Reconciler(fleet, lambda: want, lambda m: asyncio.Lock(), ControllerMetrics(), 0,
                     replicas=lambda m: plan)
    p = asyncio.run(rec.run_once())
    assert set(fleet.shards["shard-1-0:50051"]) == {"v2"}, p.errors
    assert set(fleet.shards["shard-0-1:50051"]) == {"v2"}  # the only v2 of shard 0
    assert any("shard-0-1:50051" in e for e in p.errors)  # it cannot load v1 beside it
    assert fleet.violations == []


def test_api_shows_the_plan_and_runs_blue_green(controller_config: MakeConfig) -> None:
    fleet = FakeFleet(routing=True, budget_bytes=150)
    with TestClient(build_app(controller_config(), fleet=fleet)) as c:
        body = {"model": "m", "version": "v2", "canary": [50, 100], "bake_s": 0}
        p = c.post("/v1/rollouts/plan", json=body, headers=AUTH).json()
        assert p["strategy"] == "blue_green" and p["verdict"] == "ok"
        assert "do not fit" in p["why"] and p["steps"][2] == "convert:0"
        assert c.get("/v1/history").json()["rollouts"] == []  # nothing started
        bad = c.post("/v1/rollouts", json=body | {"strategy": "sideways"}, headers=AUTH)
        assert bad.status_code == 422
        r = c.post("/v1/rollouts", json=body, headers=AUTH)
        assert r.status_code == 202, r.text
        done = wait_done(c, r.json()["id"])
        assert done["status"] == "succeeded" and done["strategy"] == "blue_green"
        assert fleet.violations == []


def test_journal_from_before_strategies_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE rollouts (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
                     "from_version TEXT NOT NULL, to_version TEXT NOT NULL, canary TEXT NOT "
                     "NULL, bake_s REAL NOT NULL, status TEXT NOT NULL, step TEXT NOT NULL, "
                     "reason TEXT NOT NULL DEFAULT '', reason_code TEXT NOT NULL DEFAULT '', "
                     "abort_requested INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, "
                     "updated_at REAL NOT NULL, finished_at REAL);"
                     "INSERT INTO rollouts VALUES ('r-1', 'm', 'v1', 'v2', '[100]', 0, "
                     "'succeeded', 'succeeded', '', '', 0, 1, 1, 1);")
    db.close()
    (r,) = Journal(path).history()
    assert str(r.strategy) == "in_place" and r.path == ()

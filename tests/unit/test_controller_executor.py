"""The executor against the in-memory fleet: the happy path, every failure, abort in
every phase, retries, and a flapping gate. After each run the fleet must serve exactly
one version everywhere and the fake must have seen no moment of possible mismatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from deploy_controller.fake import FakeFleet
from deploy_controller.fleet import FleetError
from deploy_controller.journal import Rollout
from deploy_controller.state import Status, plan
from tests.unit.controller_helpers import MakeHarness, assert_serving_only


def step_log(r: Rollout) -> list[tuple[str, str, str]]:
    return [(e.step, e.event, e.outcome) for e in r.events if e.event in ("begin", "end")]


def test_happy_path_moves_the_fleet_to_the_new_version(make_harness: MakeHarness) -> None:
    h = make_harness()
    r = h.run(h.start([25, 50, 100]))
    assert r.status is Status.SUCCEEDED and r.reason == ""
    assert_serving_only(h, "v2", gone="v1")
    expected = [s.name for s in plan([25, 50, 100])][:-1]
    assert step_log(r) == [x for n in expected for x in ((n, "begin", ""), (n, "end", "ok"))]
    shares = [e.detail.get("split") for e in r.events if e.step.startswith("shift")
              and e.event == "end"]
    assert shares == [{"v1": 0.75, "v2": 0.25}, {"v1": 0.5, "v2": 0.5}, {"v2": 1.0}]


def test_every_replica_and_ranker_is_driven(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.run(h.start())
    loads = {s for op, s in h.fleet.calls if op == "shard_load"}
    assert loads == {a for reps in h.fleet.shard_addrs for a in reps}
    assert {s for op, s in h.fleet.calls if op == "ranker_prepare"} == set(h.fleet.ranker_urls)


def test_rerunning_steps_is_idempotent(make_harness: MakeHarness) -> None:
    """Loads and prepares are skipped where the fleet already holds the version."""
    h = make_harness()
    for url in h.fleet.ranker_urls:
        h.fleet.rankers[url].versions["v2"] = "loaded"
    r = h.run(h.start())
    assert r.status is Status.SUCCEEDED
    assert not any(op == "ranker_load" for op, _ in h.fleet.calls)


@pytest.mark.parametrize(("setup", "code"), [
    (lambda f: f.fail_load.add(("*", "v2")), "ranker_load_failed"),
    (lambda f: f.fail_load.add(("shard-1-1:50051", "v2")), "shard_load_failed"),
    (lambda f: setattr(f, "budget_bytes", 150), "does_not_fit"),
    (lambda f: f.faults.setdefault(("ranker_prepare", "*"), []).extend(
        [FleetError("r", "HTTP 409: shard not ready", retryable=True, status=409)] * 10),
     "prepare_failed"),
    (lambda f: f.faults.setdefault(("ranker_split", "http://ranker-1"), []).append(
        FleetError("r", "HTTP 422: bad split", status=422)), "shift_failed"),
])
def test_failures_roll_back_to_the_old_version(make_harness: MakeHarness, setup: Callable[[FakeFleet], Any],
                                                code: str) -> None:
    h = make_harness()
    setup(h.fleet)
    r = h.run(h.start())
    assert r.status is Status.ROLLED_BACK and r.reason_code == code, r.reason
    assert_serving_only(h, "v1", gone="v2")


def test_in_place_that_stopped_fitting_names_blue_green(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.fleet.budget_bytes = 150
    r = h.run(h.start())
    assert "--strategy blue-green" in r.reason and "needs 100 bytes" in r.reason


@pytest.mark.parametrize(("behavior", "code"), [
    ({"error_rate": 0.5}, "gate_error_rate"),
    ({"latency_s": 5.0}, "gate_latency"),
    ({"mean_score": 0.9}, "gate_score_drift"),
    ({"mismatches_per_scrape": 1}, "gate_mismatch"),
])
def test_failing_gate_rolls_back(make_harness: MakeHarness, behavior: dict[str, float], code: str) -> None:
    h = make_harness()
    for k, v in behavior.items():
        setattr(h.fleet.behavior["v2"], k, v)
    r = h.run(h.start([50, 100], bake_s=0.02))
    assert r.status is Status.ROLLED_BACK and r.reason_code == code, r.reason
    assert r.step.name == "rolled_back"
    assert_serving_only(h, "v1", gone="v2")


def test_gate_failing_after_full_switch_still_rolls_back(make_harness: MakeHarness) -> None:
    h = make_harness()

    def degrade(op: str, server: str) -> None:
        if op == "ranker_activate" and server == h.fleet.ranker_urls[-1]:
            h.fleet.behavior["v2"].error_rate = 0.5

    h.fleet.hooks.append(degrade)
    r = h.run(h.start([50, 100], bake_s=0.02))
    assert r.status is Status.ROLLED_BACK and "bake:1" in r.reason
    assert_serving_only(h, "v1", gone="v2")


def test_flapping_gate_rolls_back(make_harness: MakeHarness) -> None:
    h = make_harness(gate_fail_after=2, gate_max_failures=3)
    flips = {"n": 0}

    def flap(op: str, server: str) -> None:
        if op == "ranker_metrics" and server == h.fleet.ranker_urls[0]:
            flips["n"] += 1
            h.fleet.behavior["v2"].error_rate = 0.5 if flips["n"] % 2 else 0.0

    h.fleet.hooks.append(flap)
    r = h.run(h.start([50, 100], bake_s=0.3))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "gate_flapping", r.reason
    assert_serving_only(h, "v1", gone="v2")


def test_a_single_blip_is_tolerated(make_harness: MakeHarness) -> None:
    h = make_harness(gate_fail_after=2, gate_max_failures=3)
    seen = {"n": 0}

    def blip(op: str, server: str) -> None:
        if op == "ranker_metrics" and server == h.fleet.ranker_urls[0]:
            seen["n"] += 1
            h.fleet.behavior["v2"].error_rate = 0.5 if seen["n"] == 3 else 0.0

    h.fleet.hooks.append(blip)
    r = h.run(h.start([50, 100], bake_s=0.05))
    assert r.status is Status.SUCCEEDED, r.reason
    bake = next(e for e in r.events if e.step == "bake:0" and e.event == "end")
    assert bake.detail["failures"] == 1


def test_transient_errors_are_retried(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.fleet.faults[("shard_load", "shard-0-0:50051")] = [
        FleetError("s", "UNAVAILABLE", retryable=True)] * 2
    h.fleet.faults[("ranker_unload", "*")] = [
        FleetError("r", "HTTP 409: in flight", retryable=True, status=409)]
    r = h.run(h.start())
    assert r.status is Status.SUCCEEDED, r.reason
    assert_serving_only(h, "v2", gone="v1")


ABORT_POINTS = ["load_dense:begin", "check_fit:begin", "load_embeddings:begin",
                "prepare:begin", "shift:0:begin", "bake:0:begin", "shift:1:begin",
                "bake:1:begin", "load_dense:end", "prepare:end", "shift:1:end"]


@pytest.mark.parametrize("point", ABORT_POINTS)
def test_abort_in_phase_1_or_2_rolls_back(make_harness: MakeHarness, point: str) -> None:
    h = make_harness()
    h.abort_at(point)
    r = h.run(h.start([50, 100], bake_s=0.05))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "abort", r.reason
    assert "aborted by operator: test" in r.reason
    assert_serving_only(h, "v1", gone="v2")


@pytest.mark.parametrize("point", ["unload_old_rankers:begin", "unload_old_shards:begin",
                                   "rollback_traffic:begin", "unload_new_shards:begin"])
def test_abort_in_retire_or_rollback_changes_nothing(make_harness: MakeHarness, point: str) -> None:
    h = make_harness()
    if point.startswith(("rollback", "unload_new")):
        h.fleet.fail_load.add(("*", "v2"))
    h.abort_at(point)
    r = h.run(h.start())
    want = Status.ROLLED_BACK if point.startswith(("rollback", "unload_new")) else (
        Status.SUCCEEDED)
    assert r.status is want
    assert r.reason_code != "abort"


def test_retire_step_that_keeps_failing_ends_failed_with_new_serving(make_harness: MakeHarness) -> None:
    h = make_harness(step_attempts=2)
    h.fleet.faults[("shard_unload", "*")] = [FleetError("s", "UNAVAILABLE", retryable=True)] * 9
    r = h.run(h.start())
    assert r.status is Status.FAILED and r.reason_code == "retire_failed"
    assert h.fleet.serving() == {"v2"} and h.fleet.violations == []


def test_rollback_step_that_keeps_failing_ends_failed(make_harness: MakeHarness) -> None:
    h = make_harness(step_attempts=2)
    h.fleet.fail_load.add(("*", "v2"))
    h.fleet.faults[("shard_versions", "shard-0-0:50051")] = [
        FleetError("s", "UNAVAILABLE", retryable=True)] * 99
    r = h.run(h.start())
    assert r.status is Status.FAILED and r.reason_code == "ranker_load_failed"
    assert h.fleet.serving() == {"v1"}


def test_unknown_version_rolls_back(make_harness: MakeHarness) -> None:
    h = make_harness()
    r = h.run(h.start(to="v9"))
    assert r.status is Status.ROLLED_BACK and "404" in r.reason
    assert h.fleet.serving() == {"v1"}


def test_progress_view_shows_servers(make_harness: MakeHarness) -> None:
    h = make_harness()
    views: list[dict[str, Any]] = []

    def grab(op: str, server: str) -> None:
        if op == "ranker_activate":
            (r,) = h.journal.active()
            views.append(h.executor.progress(r.id))

    h.fleet.hooks.append(grab)
    h.run(h.start([50, 100], bake_s=0.02))
    view = views[0]
    assert set(view["fleet"]["rankers"]) == set(h.fleet.ranker_urls)
    assert view["fleet"]["rankers"]["http://ranker-0"]["split"] == {"v1": 0.5, "v2": 0.5}
    assert len(view["fleet"]["shards"]) == 2
    assert view["gate"]["ok"] is True

"""Blue/green over the in-memory fleet (routing by version, one version per replica): the
plan and its capacity rule, the strategy choice, the order of calls, abort, gate rollback,
a replica lost or restarted mid-plan."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from deploy_controller import bluegreen
from deploy_controller.bluegreen import StrategyRefused, choose
from deploy_controller.state import Kind, Status, Step, Strategy
from tests.unit.controller_helpers import (
    assert_all_on,
    blue_green_harness,
    start_blue_green,
)

SHARDS2 = (("a0", "a1"), ("b0", "b1"))
SHARDS4 = (("a0", "a1", "a2", "a3"),)


def test_plan_for_two_replicas_converts_one_wave_then_the_rest() -> None:
    p = bluegreen.blue_green(SHARDS2, [50, 100], "v1", "v2", 2.0, "why")
    assert p.steps == ("load_dense", "check_plan", "convert:0", "prepare", "shift:0", "bake:0",
                       "shift:1", "bake:1", "unload_old_rankers", "convert_rest", "succeeded")
    assert p.ok and p.waves == (("a0", "b0"), ("a1", "b1"))
    rows = {r.step: r for r in p.rows}
    assert rows["convert:0"].holds == {"a0": ("v2",), "a1": ("v1",), "b0": ("v2",),
                                       "b1": ("v1",)}
    assert rows["convert:0"].load == {"v1": 2.0, "v2": 0.0}  # one replica carries a shard
    assert rows["shift:0"].load == {"v1": 1.0, "v2": 1.0}
    assert rows["bake:1"].load == {"v1": 0.0, "v2": 2.0}
    assert set(rows["convert_rest"].holds.values()) == {("v2",)}


def test_plan_converts_more_waves_before_a_share_would_overload_them() -> None:
    p = bluegreen.blue_green(SHARDS4, [25, 50, 100], "v1", "v2", 2.0, "why")
    assert p.ok, p.verdict
    # 50% on 1 of 4 replicas is 2.0x; 100% needs 2 of 4 (2.0x), so wave 1 goes first
    assert p.steps[2:] == ("convert:0", "prepare", "shift:0", "bake:0", "shift:1", "bake:1",
                           "convert:1", "shift:2", "bake:2", "unload_old_rankers",
                           "convert_rest", "succeeded")
    assert max(f for r in p.rows for f in r.load.values()) <= 2.0


@pytest.mark.parametrize(("shards", "limit", "needle"), [
    (SHARDS2, 1.5, "after convert:0, v1 would carry 2.00x"),
    (SHARDS4, 1.2, "after convert:0, v1 would carry 1.33x"),
    # 50% needs 2 new of 4 (1.0x), but then v1 (still 100%) is on 2 of 4: 2.0x
    (SHARDS4, 1.5, "after convert:1, v1 would carry 2.00x"),
])
def test_plan_verdict_names_the_first_step_the_rule_refuses(
        shards: tuple[tuple[str, ...], ...], limit: float, needle: str) -> None:
    p = bluegreen.blue_green(shards, [50, 100], "v1", "v2", limit, "why")
    assert not p.ok and needle in p.verdict, p.verdict


def test_choose_strategy() -> None:
    assert choose("auto", SHARDS2, [], [])[0] is Strategy.IN_PLACE
    s, why = choose("auto", SHARDS2, ["a0: needs 100"], [])
    assert s is Strategy.BLUE_GREEN and "do not fit" in why and "a0: needs 100" in why
    assert choose("blue_green", SHARDS2, [], [])[0] is Strategy.BLUE_GREEN
    for args, needle in [(("in_place", SHARDS2, ["x"], []), "--strategy blue-green"),
                         (("auto", (("a0",),), ["x"], []), ">= 2 replicas"),
                         (("blue_green", (("a0",), ("b0", "b1")), [], []), ">= 2 replicas"),
                         (("auto", SHARDS2, ["x"], ["a0: alone"]), "even alone")]:
        with pytest.raises(StrategyRefused) as e:
            choose(*args)
        assert e.value.status == 507 and needle in e.value.message


def test_rollout_moves_replicas_in_waves(tmp_path: Path) -> None:
    h = blue_green_harness(tmp_path)
    r = h.run(start_blue_green(h))
    assert r.status is Status.SUCCEEDED, r.reason
    assert_all_on(h, "v2", gone="v1")
    shard_ops = [(op, s) for op, s in h.fleet.calls if op in ("shard_unload", "shard_load",
                                                              "ranker_prepare", "ranker_unload")]
    first = [x for x in shard_ops if x[1] in ("shard-0-0:50051", "shard-1-0:50051")]
    assert [op for op, _ in first] == ["shard_unload", "shard_unload", "shard_load", "shard_load"]
    # wave 0 converted before any ranker prepares; wave 1 only after rankers dropped v1
    ops = [op + "@" + s for op, s in shard_ops]
    assert ops.index("shard_load@shard-0-0:50051") < ops.index("ranker_prepare@http://ranker-0")
    assert (ops.index("ranker_unload@http://ranker-0")
            < ops.index("shard_unload@shard-0-1:50051"))
    ends = {e.step: e.detail for e in r.events if e.event == "end"}
    assert ends["convert:0"]["load"] == {"v1": 2.0, "v2": 0.0}
    assert ends["shift:0"]["load"] == {"v1": 1.0, "v2": 1.0}


def test_capacity_rechecked_over_real_holdings(tmp_path: Path) -> None:
    """A replica that lost v1 (crashed, failed) leaves too little for wave 0 to drain."""
    h = blue_green_harness(tmp_path)
    del h.fleet.shards["shard-1-1:50051"]["v1"]
    r = h.run(start_blue_green(h))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "capacity", r.reason
    assert "shard 1" in r.reason and "no replica" in r.reason
    assert not any(op == "shard_unload" for op, _ in h.fleet.calls)  # refused before acting
    assert h.fleet.violations == []


@pytest.mark.parametrize("point", ["check_plan:end", "convert:0:begin", "convert:0:end",
                                   "prepare:end", "shift:0:end", "bake:0:begin", "bake:1:begin"])
def test_abort_reverses_the_steps_taken(tmp_path: Path, point: str) -> None:
    h = blue_green_harness(tmp_path)
    h.abort_at(point)
    r = h.run(start_blue_green(h, bake_s=0.05))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "abort", r.reason
    assert_all_on(h, "v1", gone="v2")
    steps = [e.step for e in r.events if e.event == "end"]
    assert steps[-3:] == ["rollback_traffic", "unload_new_rankers", "revert_replicas"]


def test_failed_gate_converts_replicas_back(tmp_path: Path) -> None:
    h = blue_green_harness(tmp_path)
    h.fleet.behavior["v2"].error_rate = 0.5
    r = h.run(start_blue_green(h))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "gate_error_rate", r.reason
    assert_all_on(h, "v1", gone="v2")
    revert = next(e for e in r.events if e.step == "revert_replicas" and e.event == "end")
    assert sorted(revert.detail["reverted"]) == ["shard-0-0:50051", "shard-1-0:50051"]


def test_failed_load_of_the_new_version_rolls_back(tmp_path: Path) -> None:
    h = blue_green_harness(tmp_path)
    h.fleet.fail_load.add(("shard-1-0:50051", "v2"))
    r = h.run(start_blue_green(h))
    assert r.status is Status.ROLLED_BACK and r.reason_code == "convert_failed", r.reason
    assert_all_on(h, "v1", gone="v2")


def test_replica_restarted_mid_plan_is_converted_again(tmp_path: Path) -> None:
    """After convert:0 a replica comes back holding v1 (the desired state's active one):
    prepare re-asserts wave 0 before the rankers look for v2."""
    h = blue_green_harness(tmp_path)

    def restart(point: str) -> None:
        h.fleet.shards["shard-0-0:50051"] = {"v1": h.fleet._shard_version("v1")}

    h.executor.cfg = replace(h.cfg, crash_at="convert:0:end")
    h.executor._crash = restart
    r = h.run(start_blue_green(h))
    assert r.status is Status.SUCCEEDED, r.reason
    assert_all_on(h, "v2", gone="v1")
    assert h.fleet.calls.count(("shard_unload", "shard-0-0:50051")) == 2  # v1, then v1 again
    prepare = next(e for e in r.events if e.step == "prepare" and e.event == "end")
    assert prepare.outcome == "ok"


def test_step_kinds_in_the_path_parse_back() -> None:
    p = bluegreen.blue_green(SHARDS4, [25, 50, 100], "v1", "v2", 2.0, "why")
    assert [Step.parse(n).name for n in p.steps] == list(p.steps)
    assert Step.parse("convert:2") == Step(Kind.CONVERT, 2)


def test_plan_needs_no_event_loop_and_in_place_rows() -> None:
    p = bluegreen.in_place(SHARDS2, [100], "v1", "v2", "fits")
    rows = {r.step: r for r in p.rows}
    assert rows["load_embeddings"].holds["a0"] == ("v1", "v2")
    assert rows["unload_old_shards"].holds["b1"] == ("v2",)
    assert asyncio.iscoroutinefunction(bluegreen.blue_green) is False

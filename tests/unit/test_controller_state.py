"""The rollout state machine: every row of the transition table, plans, and guards."""

from __future__ import annotations

import pytest

from deploy_controller.state import (
    PHASE_OF,
    TERMINAL,
    TRANSITIONS,
    Guard,
    Kind,
    Outcome,
    Phase,
    Status,
    Step,
    TransitionError,
    abortable,
    next_step,
    plan,
    status_for,
    validate_canary,
)

CANARY = [5, 25, 100]
FORWARD = [Kind.LOAD_DENSE, Kind.CHECK_FIT, Kind.LOAD_EMBEDDINGS, Kind.PREPARE, Kind.SHIFT,
           Kind.BAKE]
RETIRE = [Kind.UNLOAD_OLD_RANKERS, Kind.UNLOAD_OLD_SHARDS]
ROLLBACK = [Kind.ROLLBACK_TRAFFIC, Kind.UNLOAD_NEW_RANKERS, Kind.UNLOAD_NEW_SHARDS]


def test_plan_walks_three_phases_in_order() -> None:
    names = [s.name for s in plan(CANARY)]
    assert names == ["load_dense", "check_fit", "load_embeddings", "prepare",
                     "shift:0", "bake:0", "shift:1", "bake:1", "shift:2", "bake:2",
                     "unload_old_rankers", "unload_old_shards", "succeeded"]
    phases = [s.phase for s in plan(CANARY)]
    assert phases == sorted(phases), "phases only move forward on the happy path"


@pytest.mark.parametrize("canary", [[100], [50, 100], [1, 2, 3, 100]])
def test_plan_has_one_shift_and_bake_per_canary_share(canary: list[int]) -> None:
    steps = plan(canary)
    assert [s.index for s in steps if s.kind is Kind.SHIFT] == list(range(len(canary)))
    assert [s.index for s in steps if s.kind is Kind.BAKE] == list(range(len(canary)))


@pytest.mark.parametrize("kind", FORWARD)
@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.ABORTED])
def test_failure_or_abort_in_phase_1_and_2_rolls_back(kind: Kind, outcome: Outcome) -> None:
    for index in range(len(CANARY)) if kind in (Kind.SHIFT, Kind.BAKE) else [0]:
        nxt = next_step(Step(kind, index), outcome, CANARY)
        assert nxt == Step(Kind.ROLLBACK_TRAFFIC)
        assert status_for(nxt) is Status.ROLLING_BACK


@pytest.mark.parametrize("kind", RETIRE + ROLLBACK)
def test_abort_has_no_row_in_retire_or_rollback(kind: Kind) -> None:
    assert not abortable(Step(kind))
    with pytest.raises(TransitionError):
        next_step(Step(kind), Outcome.ABORTED, CANARY)


@pytest.mark.parametrize("kind", FORWARD)
def test_phase_1_and_2_steps_are_abortable(kind: Kind) -> None:
    assert abortable(Step(kind))


@pytest.mark.parametrize("kind", RETIRE + ROLLBACK)
def test_failure_in_retire_or_rollback_ends_failed(kind: Kind) -> None:
    nxt = next_step(Step(kind), Outcome.FAILED, CANARY)
    assert nxt == Step(Kind.FAILED) and status_for(nxt) is Status.FAILED


def test_rollback_path() -> None:
    s = Step(Kind.ROLLBACK_TRAFFIC)
    seen = [s.kind]
    while not s.terminal:
        s = next_step(s, Outcome.OK, CANARY)
        seen.append(s.kind)
    assert seen == [*ROLLBACK, Kind.ROLLED_BACK]


def test_bake_guard_more_vs_last() -> None:
    assert next_step(Step(Kind.BAKE, 0), Outcome.OK, CANARY) == Step(Kind.SHIFT, 1)
    assert next_step(Step(Kind.BAKE, 1), Outcome.OK, CANARY) == Step(Kind.SHIFT, 2)
    assert next_step(Step(Kind.BAKE, 2), Outcome.OK, CANARY) == Step(Kind.UNLOAD_OLD_RANKERS)
    assert next_step(Step(Kind.SHIFT, 1), Outcome.OK, CANARY) == Step(Kind.BAKE, 1)


@pytest.mark.parametrize("kind", sorted(TERMINAL))
def test_terminal_steps_have_no_way_out(kind: Kind) -> None:
    for outcome in Outcome:
        with pytest.raises(TransitionError):
            next_step(Step(kind), outcome, CANARY)


def test_every_row_is_reachable_and_every_target_known() -> None:
    """Each table row is taken by some walk; no row points at an unknown kind."""
    taken = set()
    for kind in Kind:
        for outcome in Outcome:
            for index in range(len(CANARY)):
                try:
                    next_step(Step(kind, index), outcome, CANARY)
                except TransitionError:
                    continue
                guard = Guard.ALWAYS
                if kind is Kind.BAKE:
                    guard = Guard.LAST if index == len(CANARY) - 1 else Guard.MORE
                taken.add((kind, outcome, guard))
    assert taken == set(TRANSITIONS)
    assert set(TRANSITIONS.values()) <= set(Kind)
    assert set(PHASE_OF) == set(Kind)


def test_status_for_each_phase() -> None:
    assert status_for(Step(Kind.LOAD_DENSE)) is Status.RUNNING
    assert status_for(Step(Kind.UNLOAD_OLD_SHARDS)) is Status.RUNNING
    assert status_for(Step(Kind.UNLOAD_NEW_RANKERS)) is Status.ROLLING_BACK
    assert status_for(Step(Kind.SUCCEEDED)) is Status.SUCCEEDED
    assert status_for(Step(Kind.ROLLED_BACK)) is Status.ROLLED_BACK
    assert Step(Kind.SHIFT, 2).phase is Phase.STAGE_EMBEDDINGS


def test_step_names_round_trip() -> None:
    for s in plan(CANARY) + [Step(k) for k in ROLLBACK]:
        assert Step.parse(s.name) == s


@pytest.mark.parametrize("bad", [[], [0, 100], [50, 40, 100], [5, 25], [5, 5, 100], [101]])
def test_validate_canary_rejects(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        validate_canary(bad)


def test_validate_canary_accepts() -> None:
    assert validate_canary((5, 25, 100)) == [5, 25, 100]
    assert validate_canary([100]) == [100]

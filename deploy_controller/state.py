"""The rollout state machine: phases, steps, and one explicit table of transitions.

A rollout is a walk through steps. Each step belongs to a phase and ends with one of
three outcomes; `TRANSITIONS` says, for every (step kind, outcome, guard), which step
comes next. Nothing else decides where a rollout goes, so the table is the whole
behaviour and the unit tests walk every row of it.

Canary steps are indexed: SHIFT(i) puts canary[i] percent of traffic on the new
version and BAKE(i) watches it; the guard MORE/LAST tells whether canary[i] was the
last share. A blue/green rollout (bluegreen.py) walks its own journaled forward path
(`Strategy.BLUE_GREEN`: CONVERT(w) moves wave w of replicas to the new version between
the canary steps); its failures, aborts and its way back are rows of the same table, and
`BLUE_GREEN_ROWS` holds the rows where its way differs from the in-place one.
Every step is idempotent (see executor.py): re-running one after a crash converges to
the same fleet state.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass


class Phase(enum.IntEnum):
    """Where a rollout is; the integer is what the phase gauge exports."""

    STAGE_DENSE = 1
    STAGE_EMBEDDINGS = 2
    RETIRE = 3
    ROLLBACK = 4
    DONE = 5


class Kind(enum.StrEnum):
    """Step kinds; the string is what the journal stores."""

    LOAD_DENSE = "load_dense"  # every ranker loads the new dense model beside the old
    CHECK_FIT = "check_fit"  # every shard replica says the new tables fit beside the old
    LOAD_EMBEDDINGS = "load_embeddings"  # every shard replica loads the new tables
    PREPARE = "prepare"  # every ranker runs the prepare handshake for the new version
    SHIFT = "shift"  # every ranker gets split {old: 1-p, new: p} (p = 1: activate new)
    BAKE = "bake"  # wait bake_s, gating on the rankers' metrics
    UNLOAD_OLD_RANKERS = "unload_old_rankers"  # rankers drop the old version
    UNLOAD_OLD_SHARDS = "unload_old_shards"  # then shard replicas drop it
    ROLLBACK_TRAFFIC = "rollback_traffic"  # every ranker: activate the old version again
    UNLOAD_NEW_RANKERS = "unload_new_rankers"  # rankers drop the new version
    UNLOAD_NEW_SHARDS = "unload_new_shards"  # then shard replicas drop it
    # Blue/green (bluegreen.py): replicas hold one version at a time.
    CHECK_PLAN = "check_plan"  # R >= 2, the new version fits a replica alone, capacity ok
    CONVERT = "convert"  # wave w: one replica per shard drops the old version, loads the new
    CONVERT_REST = "convert_rest"  # retire: every replica still holding the old converts
    REVERT_REPLICAS = "revert_replicas"  # rollback: converted replicas load the old again
    # Terminal pseudo-steps: reaching one ends the rollout with that status.
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


PHASE_OF: dict[Kind, Phase] = {
    Kind.LOAD_DENSE: Phase.STAGE_DENSE,
    Kind.CHECK_FIT: Phase.STAGE_EMBEDDINGS,
    Kind.LOAD_EMBEDDINGS: Phase.STAGE_EMBEDDINGS,
    Kind.PREPARE: Phase.STAGE_EMBEDDINGS,
    Kind.SHIFT: Phase.STAGE_EMBEDDINGS,
    Kind.BAKE: Phase.STAGE_EMBEDDINGS,
    Kind.UNLOAD_OLD_RANKERS: Phase.RETIRE,
    Kind.UNLOAD_OLD_SHARDS: Phase.RETIRE,
    Kind.ROLLBACK_TRAFFIC: Phase.ROLLBACK,
    Kind.UNLOAD_NEW_RANKERS: Phase.ROLLBACK,
    Kind.UNLOAD_NEW_SHARDS: Phase.ROLLBACK,
    Kind.CHECK_PLAN: Phase.STAGE_EMBEDDINGS,
    Kind.CONVERT: Phase.STAGE_EMBEDDINGS,
    Kind.CONVERT_REST: Phase.RETIRE,
    Kind.REVERT_REPLICAS: Phase.ROLLBACK,
    Kind.SUCCEEDED: Phase.DONE,
    Kind.ROLLED_BACK: Phase.DONE,
    Kind.FAILED: Phase.DONE,
}

TERMINAL = frozenset({Kind.SUCCEEDED, Kind.ROLLED_BACK, Kind.FAILED})


class Status(enum.StrEnum):
    """A rollout's status as the journal and the API show it."""

    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # a step of retire or rollback kept failing: an operator must look


ACTIVE_STATUSES = frozenset({Status.RUNNING, Status.ROLLING_BACK})


class Strategy(enum.StrEnum):
    """How the embedding tier moves: both versions on every replica, or one per replica."""

    IN_PLACE = "in_place"
    BLUE_GREEN = "blue_green"


class Outcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"  # the step could not reach its goal (or its gate failed)
    ABORTED = "aborted"  # an operator asked to stop


class Guard(enum.Enum):
    ALWAYS = "always"
    MORE = "more"  # canary[i] is not the last share
    LAST = "last"  # canary[i] is the last share


def _rows() -> dict[tuple[Kind, Outcome, Guard], Kind]:
    t: dict[tuple[Kind, Outcome, Guard], Kind] = {
        (Kind.LOAD_DENSE, Outcome.OK, Guard.ALWAYS): Kind.CHECK_FIT,
        (Kind.CHECK_FIT, Outcome.OK, Guard.ALWAYS): Kind.LOAD_EMBEDDINGS,
        (Kind.LOAD_EMBEDDINGS, Outcome.OK, Guard.ALWAYS): Kind.PREPARE,
        (Kind.PREPARE, Outcome.OK, Guard.ALWAYS): Kind.SHIFT,
        (Kind.SHIFT, Outcome.OK, Guard.ALWAYS): Kind.BAKE,
        (Kind.BAKE, Outcome.OK, Guard.MORE): Kind.SHIFT,
        (Kind.BAKE, Outcome.OK, Guard.LAST): Kind.UNLOAD_OLD_RANKERS,
        (Kind.UNLOAD_OLD_RANKERS, Outcome.OK, Guard.ALWAYS): Kind.UNLOAD_OLD_SHARDS,
        (Kind.UNLOAD_OLD_SHARDS, Outcome.OK, Guard.ALWAYS): Kind.SUCCEEDED,
        # Retire cannot go back (the old version is being unloaded) and cannot be
        # aborted; a step that keeps failing leaves the new version serving and an
        # operator to finish the cleanup.
        (Kind.UNLOAD_OLD_RANKERS, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.UNLOAD_OLD_SHARDS, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.ROLLBACK_TRAFFIC, Outcome.OK, Guard.ALWAYS): Kind.UNLOAD_NEW_RANKERS,
        (Kind.UNLOAD_NEW_RANKERS, Outcome.OK, Guard.ALWAYS): Kind.UNLOAD_NEW_SHARDS,
        (Kind.UNLOAD_NEW_SHARDS, Outcome.OK, Guard.ALWAYS): Kind.ROLLED_BACK,
        (Kind.ROLLBACK_TRAFFIC, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.UNLOAD_NEW_RANKERS, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.UNLOAD_NEW_SHARDS, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.CONVERT_REST, Outcome.OK, Guard.ALWAYS): Kind.SUCCEEDED,
        (Kind.CONVERT_REST, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
        (Kind.REVERT_REPLICAS, Outcome.OK, Guard.ALWAYS): Kind.ROLLED_BACK,
        (Kind.REVERT_REPLICAS, Outcome.FAILED, Guard.ALWAYS): Kind.FAILED,
    }
    # Phases 1 and 2: the old version is loaded everywhere and can take all traffic
    # back, so any failure or abort rolls back.
    # Blue/green keeps the old version READY on at least one replica of every shard until
    # the last canary step passed, so the same holds for its stage steps.
    for k in (Kind.LOAD_DENSE, Kind.CHECK_FIT, Kind.LOAD_EMBEDDINGS, Kind.PREPARE, Kind.SHIFT,
              Kind.BAKE, Kind.CHECK_PLAN, Kind.CONVERT):
        for o in (Outcome.FAILED, Outcome.ABORTED):
            for g in ((Guard.MORE, Guard.LAST) if k is Kind.BAKE else (Guard.ALWAYS,)):
                t[(k, o, g)] = Kind.ROLLBACK_TRAFFIC
    return t


TRANSITIONS: dict[tuple[Kind, Outcome, Guard], Kind] = _rows()

# Where blue/green's way back differs: the new version is on whole replicas, so once the
# rankers dropped it, those replicas load the old version again (not just unload).
BLUE_GREEN_ROWS: dict[tuple[Kind, Outcome, Guard], Kind] = {
    (Kind.UNLOAD_NEW_RANKERS, Outcome.OK, Guard.ALWAYS): Kind.REVERT_REPLICAS,
}

FIRST = Kind.LOAD_DENSE


class TransitionError(ValueError):
    """An (step, outcome) pair that has no row in the table."""


@dataclass(frozen=True, order=True)
class Step:
    """One step of a rollout; `index` is the canary index for SHIFT and BAKE, the wave for
    CONVERT, else 0."""

    kind: Kind
    index: int = 0

    @property
    def phase(self) -> Phase:
        return PHASE_OF[self.kind]

    @property
    def name(self) -> str:
        """Journal name: `shift:1`, `bake:1` for canary steps, the kind otherwise."""
        indexed = self.kind in (Kind.SHIFT, Kind.BAKE, Kind.CONVERT)
        return f"{self.kind}:{self.index}" if indexed else str(self.kind)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL

    @classmethod
    def parse(cls, name: str) -> Step:
        kind, _, idx = name.partition(":")
        return cls(Kind(kind), int(idx) if idx else 0)


def abortable(step: Step) -> bool:
    """Whether an abort can still stop this step (i.e. the table has a row for it)."""
    return any(k == step.kind and o is Outcome.ABORTED for k, o, _ in TRANSITIONS)


def next_step(step: Step, outcome: Outcome, canary: Sequence[int],
              path: Sequence[str] = ()) -> Step:
    """The step after `step` ended with `outcome`; TransitionError if the table has none.

    path: a blue/green rollout's journaled forward path (step names); empty for in-place.
    """
    if path:
        if outcome is Outcome.OK and step.name in path[:-1]:
            return Step.parse(path[list(path).index(step.name) + 1])
        row = BLUE_GREEN_ROWS.get((step.kind, outcome, Guard.ALWAYS))
        if row is not None:
            return Step(row)
    guard = Guard.ALWAYS
    if step.kind is Kind.BAKE:
        guard = Guard.LAST if step.index >= len(canary) - 1 else Guard.MORE
    to = TRANSITIONS.get((step.kind, outcome, guard))
    if to is None:
        raise TransitionError(f"no transition from {step.name} on {outcome}")
    if to is Kind.SHIFT:
        return Step(Kind.SHIFT, step.index + 1 if step.kind is Kind.BAKE else 0)
    if to is Kind.BAKE:
        return Step(Kind.BAKE, step.index)
    return Step(to)


def status_for(step: Step) -> Status:
    """The rollout status while at (or having reached) `step`."""
    if step.kind is Kind.SUCCEEDED:
        return Status.SUCCEEDED
    if step.kind is Kind.ROLLED_BACK:
        return Status.ROLLED_BACK
    if step.kind is Kind.FAILED:
        return Status.FAILED
    return Status.ROLLING_BACK if step.phase is Phase.ROLLBACK else Status.RUNNING


def plan(canary: Sequence[int]) -> list[Step]:
    """The forward path of a rollout with these canary shares, first step to SUCCEEDED."""
    steps = [Step(FIRST)]
    while not steps[-1].terminal:
        steps.append(next_step(steps[-1], Outcome.OK, canary))
    return steps


def validate_canary(canary: Sequence[int]) -> list[int]:
    """Canary shares in percent: strictly increasing, each in 1..100, ending at 100."""
    shares = [int(p) for p in canary]
    if not shares:
        raise ValueError("canary needs at least one step (e.g. [100])")
    if any(not 1 <= p <= 100 for p in shares):
        raise ValueError(f"canary shares must be percentages in 1..100, got {shares}")
    if any(b <= a for a, b in itertools.pairwise(shares)):
        raise ValueError(f"canary shares must be strictly increasing, got {shares}")
    if shares[-1] != 100:
        raise ValueError(f"the last canary share must be 100, got {shares}")
    return shares

"""Which strategy a rollout takes, and the plan it follows (pure: no fleet calls here).

In place (state.plan): every shard replica holds the old and the new version at once.
Blue/green, when two versions do not fit one replica: replicas hold one version each and
move in waves. Wave w is replica w of every shard; CONVERT(w) drains it (UnloadVersion
of the old version: in-flight lookups finish, clients route the old version's lookups to
the other replicas), then loads and verifies the new version on it. Wave 0 comes first;
once every shard has a replica with the new version the rankers prepare it (they accept
one replica per shard), and the canary shifts traffic as in place, with a further wave
converted before any shift whose new share would overload the new version's replicas.
After the last bake the rankers drop the old version and CONVERT_REST converts every
replica left. Rollback activates the old version (still on >= 1 replica per shard),
the rankers drop the new one, REVERT_REPLICAS loads the old version back.

The capacity rule (config `bluegreen_max_load`, default 2.0): a version's load factor on
a shard is its traffic share x the shard's replicas / the replicas holding it, i.e. how
many times its steady per-replica load (every replica serving) each of those replicas
carries. The plan, and the executor again before every CONVERT and SHIFT over what the
replicas really hold, refuses a step after which some version's factor would exceed the
limit. With 2 replicas per shard the factor reaches 2.0 (one replica carries a shard's
traffic while the other converts), so 2.0 is the least a 2-replica fleet can run with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deploy_controller.state import Kind, Step, Strategy, plan

Shards = Sequence[Sequence[str]]
Holds = dict[str, tuple[str, ...]]


class StrategyRefused(Exception):
    """No strategy can roll this out; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Row:
    """The fleet after one step of the plan."""

    step: str
    split: dict[str, float]  # traffic share per version on the rankers
    holds: Holds  # replica address -> the versions it holds
    load: dict[str, float]  # version -> its worst load factor over the shards

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "split": self.split,
                "holds": {a: list(vs) for a, vs in self.holds.items()},
                "load": {v: (round(f, 3) if math.isfinite(f) else None)
                         for v, f in self.load.items()}}


@dataclass(frozen=True)
class Plan:
    strategy: Strategy
    why: str  # why this strategy (shown by status, history and the logs)
    steps: tuple[str, ...]  # the forward path, first step to SUCCEEDED
    shards: tuple[tuple[str, ...], ...]
    max_load: float
    rows: tuple[Row, ...]
    verdict: str  # "ok", or why the capacity rule refuses the plan

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def waves(self) -> tuple[tuple[str, ...], ...]:
        """Wave w: replica w of every shard that has one."""
        return waves(self.shards)

    def to_json(self) -> dict[str, Any]:
        return {"strategy": str(self.strategy), "why": self.why, "steps": list(self.steps),
                "shards": [list(r) for r in self.shards], "max_load": self.max_load,
                "waves": [list(w) for w in self.waves], "verdict": self.verdict,
                "rows": [r.to_json() for r in self.rows]}


def waves(shards: Shards) -> tuple[tuple[str, ...], ...]:
    r = max((len(reps) for reps in shards), default=0)
    return tuple(tuple(reps[w] for reps in shards if w < len(reps)) for w in range(r))


def shards_of(plan_json: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(a) for a in reps) for reps in plan_json.get("shards", ()))


def load_factor(shards: Shards, holds: Holds, split: dict[str, float], version: str
                ) -> tuple[float, int]:
    """(worst factor, its shard) of `version`: share x replicas / replicas holding it."""
    share = split.get(version, 0.0)
    worst, where = 0.0, -1
    for k, reps in enumerate(shards):
        n = sum(1 for a in reps if version in holds.get(a, ()))
        f = 0.0 if share <= 0 else math.inf if n == 0 else share * len(reps) / n
        if f > worst:
            worst, where = f, k
    return worst, where


def _split(old: str, new: str, pct: int) -> dict[str, float]:
    share = pct / 100.0
    return {new: 1.0} if share >= 1.0 else {old: round(1 - share, 6), new: round(share, 6)}


def in_place(shards: Shards, canary: Sequence[int], old: str, new: str, why: str) -> Plan:
    """The in-place path with what every replica holds after each step (for --plan)."""
    holds: Holds = {a: (old,) for reps in shards for a in reps}
    split = {old: 1.0}
    rows = []
    for s in plan(canary)[:-1]:
        if s.kind is Kind.LOAD_EMBEDDINGS:
            holds = {a: (old, new) for a in holds}
        elif s.kind is Kind.SHIFT:
            split = _split(old, new, canary[s.index])
        elif s.kind is Kind.UNLOAD_OLD_SHARDS:
            holds = {a: (new,) for a in holds}
        rows.append(Row(s.name, split, dict(holds),
                        {v: load_factor(shards, holds, split, v)[0] for v in (old, new)}))
    return Plan(Strategy.IN_PLACE, why, tuple(s.name for s in plan(canary)),
                tuple(tuple(r) for r in shards), 0.0, tuple(rows), "ok")


def blue_green(shards: Shards, canary: Sequence[int], old: str, new: str, max_load: float,
               why: str) -> Plan:
    """The blue/green path; its verdict names the first step the capacity rule refuses."""
    ws = waves(shards)
    holds: Holds = {a: (old,) for reps in shards for a in reps}
    split = {old: 1.0}
    steps: list[str] = [Step(Kind.LOAD_DENSE).name, Step(Kind.CHECK_PLAN).name]
    rows: list[Row] = []
    problems: list[str] = []
    done = 0  # waves converted

    def record(name: str) -> None:
        steps.append(name)
        load = {v: load_factor(shards, holds, split, v) for v in (old, new)}
        rows.append(Row(name, dict(split), dict(holds), {v: f for v, (f, _) in load.items()}))
        for v, (f, k) in load.items():
            if f > max_load and not problems:
                problems.append(f"after {name}, {v} would carry {f:.2f}x its steady load per "
                                f"replica on shard {k} (limit bluegreen_max_load "
                                f"{max_load:g})" if math.isfinite(f) else
                                f"after {name}, shard {k} would have no replica holding {v} "
                                "while it has traffic")

    def convert() -> None:
        nonlocal done
        for a in ws[done]:
            holds[a] = (new,)
        record(Step(Kind.CONVERT, done).name)
        done += 1

    rows.append(Row(steps[0], dict(split), dict(holds), {old: 1.0, new: 0.0}))
    rows.append(Row(steps[1], dict(split), dict(holds), {old: 1.0, new: 0.0}))
    convert()
    record(Step(Kind.PREPARE).name)
    for i, pct in enumerate(canary):
        want = _split(old, new, pct)
        # Convert more waves while the next share would overload the new version's replicas
        # (and while the old version keeps a replica on every shard; record() checks both).
        while done < len(ws) - 1 and load_factor(shards, holds, want, new)[0] > max_load:
            convert()
        split = want
        record(Step(Kind.SHIFT, i).name)
        record(Step(Kind.BAKE, i).name)
    record(Step(Kind.UNLOAD_OLD_RANKERS).name)
    holds = {a: (new,) for a in holds}
    record(Step(Kind.CONVERT_REST).name)
    steps.append(Step(Kind.SUCCEEDED).name)
    return Plan(Strategy.BLUE_GREEN, why, tuple(steps), tuple(tuple(r) for r in shards),
                max_load, tuple(rows), problems[0] if problems else "ok")


def choose(requested: str, shards: Shards, no_fit_beside: Sequence[str],
           no_fit_alone: Sequence[str]) -> tuple[Strategy, str]:
    """(strategy, why) for a rollout; StrategyRefused (507) when none can work.

    requested: auto | in_place | blue_green. no_fit_beside: replicas where the new
    version does not fit beside the old (check_fit's refusals); no_fit_alone: those where
    it does not fit even with the old one unloaded.
    """
    if no_fit_alone:
        raise StrategyRefused(507, "the new version does not fit a shard replica even alone: "
                              + "; ".join(no_fit_alone))
    min_r = min((len(r) for r in shards), default=0)
    if requested == Strategy.IN_PLACE or (requested == "auto" and not no_fit_beside):
        if no_fit_beside:
            raise StrategyRefused(507, "in-place refused, two versions do not fit: "
                                  + "; ".join(no_fit_beside) + (
                                      "; --strategy blue-green (or auto) can roll it out"
                                      if min_r >= 2 else ""))
        return Strategy.IN_PLACE, ("asked for in-place" if requested == Strategy.IN_PLACE else
                                   "both versions fit every shard replica")
    if min_r < 2:
        raise StrategyRefused(507, f"blue/green needs >= 2 replicas per shard, the fleet has "
                              f"{min_r} on some shard" + (
                                  "; and two versions do not fit: " + "; ".join(no_fit_beside)
                                  if no_fit_beside else ""))
    if requested == Strategy.BLUE_GREEN:
        return Strategy.BLUE_GREEN, "asked for blue/green"
    return Strategy.BLUE_GREEN, ("two versions do not fit one replica ("
                                 + "; ".join(no_fit_beside) + "), every shard has >= 2 replicas")

"""A rollout and its events as the journal stores them (journal.py reads and writes them)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from deploy_controller.state import ACTIVE_STATUSES, Status, Step, Strategy


@dataclass(frozen=True)
class Event:
    seq: int
    step: str
    event: str
    outcome: str
    detail: dict[str, Any]
    ts: float


@dataclass(frozen=True)
class Rollout:
    id: str
    model: str
    from_version: str
    to_version: str
    canary: list[int]
    bake_s: float
    status: Status
    step: Step
    reason: str = ""
    reason_code: str = ""
    abort_requested: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    events: list[Event] = field(default_factory=list)
    strategy: Strategy = Strategy.IN_PLACE
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> tuple[str, ...]:
        """A blue/green rollout's forward path (step names); () for in-place."""
        return tuple(self.plan.get("steps", ())) if self.strategy is Strategy.BLUE_GREEN else ()

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def start(self) -> float:
        """When it began acting on the fleet: its first event (or its creation)."""
        return self.events[0].ts if self.events else self.created_at

    @property
    def end(self) -> float:
        """When it finished, or its last event while it runs."""
        if self.finished_at is not None:
            return self.finished_at
        return self.events[-1].ts if self.events else self.created_at

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "from_version": self.from_version,
            "to_version": self.to_version, "canary": self.canary, "bake_s": self.bake_s,
            "status": str(self.status), "phase": self.step.phase.name.lower(),
            "step": self.step.name, "reason": self.reason, "reason_code": self.reason_code,
            "abort_requested": self.abort_requested, "strategy": str(self.strategy),
            "plan": self.plan, "created_at": self.created_at,
            "updated_at": self.updated_at, "finished_at": self.finished_at,
            "events": [{"step": e.step, "event": e.event, "outcome": e.outcome,
                        "detail": e.detail, "ts": e.ts} for e in self.events],
        }


def row_to_rollout(r: sqlite3.Row, events: list[Event]) -> Rollout:
    cols = set(r.keys())  # a journal read-only from before strategy/plan existed lacks them
    return Rollout(
        id=r["id"], model=r["model"], from_version=r["from_version"], to_version=r["to_version"],
        canary=[int(x) for x in json.loads(r["canary"])], bake_s=float(r["bake_s"]),
        status=Status(r["status"]), step=Step.parse(r["step"]), reason=r["reason"],
        reason_code=r["reason_code"], abort_requested=bool(r["abort_requested"]),
        created_at=r["created_at"], updated_at=r["updated_at"], finished_at=r["finished_at"],
        events=events, strategy=Strategy(r["strategy"] if "strategy" in cols else "in_place"),
        plan=json.loads(r["plan"]) if "plan" in cols else {})

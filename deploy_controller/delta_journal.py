"""The journal's side of delta streams: each model's committed seq and each delta operation.

Tables `delta_streams` and `delta_ops` live in the rollout journal's SQLite file (schema in
journal.py), so one IMMEDIATE transaction can check that neither a rollout nor another
delta operation is acting on the model, and a rollout's end can restart the stream at the
new version's seq 0 in the transaction that ends it (journal._restart_stream).

An operation is a walk like a rollout's: its row names the current step (the one to run
next, or the one running); every step is idempotent, so a restarted controller re-runs
it (recovery.py). Its end, the stream's new committed seq and a pause commit together.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from deploy_controller.journal import Journal, ModelBusyError


class OpStep(enum.StrEnum):
    APPLY = "apply"  # every shard replica: ApplyDeltas(to_seq), confirmed readable
    RANKERS = "rankers"  # every ranker reads the version at to_seq
    GATE = "gate"  # health gate over a short window (advances only)
    COMMIT = "commit"  # journal + desired state: to_seq is the committed seq
    REVERT = "revert"  # a failed advance: rankers back to from_seq, replicas realigned
    DONE = "done"


class OpStatus(enum.StrEnum):
    RUNNING = "running"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"  # a failed advance whose rankers went back to from_seq
    FAILED = "failed"  # nothing committed (and, where it got that far, rankers moved back)


class Pause(enum.StrEnum):
    """Why a stream does not advance by itself ('' = it follows)."""

    OPERATOR = "operator"  # `deployctl delta pause` or `revert`
    REFUSED = "refused"  # a delta failed verification (controller's or a shard's)
    GATE = "gate"  # an advance failed its health gate
    FAILED = "failed"  # an advance failed after rankers moved


@dataclass(frozen=True)
class Stream:
    model: str
    version: str
    committed_seq: int = 0
    committed_at: float | None = None
    written_at: float | None = None  # the committed delta's written_at (freshness)
    paused: str = ""
    pause_reason: str = ""
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "committed_seq": self.committed_seq, "committed_at": self.committed_at,
                "written_at": self.written_at, "paused": self.paused,
                "pause_reason": self.pause_reason}


@dataclass(frozen=True)
class DeltaOp:
    id: str
    model: str
    version: str
    kind: str  # advance | revert
    from_seq: int
    to_seq: int
    step: OpStep
    status: OpStatus
    reason: str = ""
    reason_code: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None

    @property
    def running(self) -> bool:
        return self.status is OpStatus.RUNNING

    def to_json(self) -> dict[str, Any]:
        public = {k: v for k, v in self.detail.items() if k not in ("baseline", "prev")}
        return {"id": self.id, "model": self.model, "version": self.version, "kind": self.kind,
                "from_seq": self.from_seq, "to_seq": self.to_seq, "step": str(self.step),
                "status": str(self.status), "reason": self.reason,
                "reason_code": self.reason_code, "detail": public,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "finished_at": self.finished_at}


class DeltaJournal:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    # ------------------------------------------------------------------ streams

    def stream(self, model: str) -> Stream | None:
        rows = self.journal.query("SELECT * FROM delta_streams WHERE model = ?", (model,))
        return _stream(rows[0]) if rows else None

    def streams(self) -> list[Stream]:
        return [_stream(r) for r in self.journal.query(
            "SELECT * FROM delta_streams ORDER BY model")]

    def ensure(self, model: str, version: str) -> Stream:
        """The model's stream; created at seq 0 of `version` if the journal has none.

        A stream following another version than the one serving (a version changed
        outside the controller) starts over at `version`'s seq 0.
        """
        now = time.time()
        with self.journal.tx() as db:
            db.execute(
                "INSERT INTO delta_streams (model, version, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT(model) DO UPDATE SET version = excluded.version,"
                " committed_seq = 0, committed_at = NULL, written_at = NULL,"
                " updated_at = excluded.updated_at WHERE version != excluded.version",
                (model, version, now))
        got = self.stream(model)
        assert got is not None
        return got

    def pause(self, model: str, kind: Pause, reason: str) -> None:
        with self.journal.tx() as db:
            db.execute("UPDATE delta_streams SET paused = ?, pause_reason = ?, updated_at = ?"
                       " WHERE model = ?", (str(kind), reason, time.time(), model))

    def resume(self, model: str) -> None:
        with self.journal.tx() as db:
            db.execute("UPDATE delta_streams SET paused = '', pause_reason = '', updated_at = ?"
                       " WHERE model = ?", (time.time(), model))

    # ------------------------------------------------------------------ operations

    def start(self, model: str, version: str, kind: str, from_seq: int, to_seq: int,
              detail: dict[str, Any] | None = None) -> DeltaOp:
        """A new running operation; ModelBusyError if a rollout or another one is running."""
        oid = "d-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self.journal.tx() as db:
            r = db.execute("SELECT id FROM rollouts WHERE model = ? AND status IN "
                           "('running', 'rolling_back')", (model,)).fetchone()
            if r is not None:
                raise ModelBusyError(f"model {model!r} has an active rollout {r['id']}; "
                                     "deltas wait until it ends")
            op = db.execute("SELECT id, kind, to_seq FROM delta_ops WHERE model = ? AND "
                            "status = 'running'", (model,)).fetchone()
            if op is not None:
                raise ModelBusyError(f"model {model!r} already has a delta {op['kind']} to seq "
                                     f"{op['to_seq']} running ({op['id']})")
            db.execute("INSERT INTO delta_ops (id, model, version, kind, from_seq, to_seq, step,"
                       " status, detail, created_at, updated_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (oid, model, version, kind, from_seq, to_seq, str(OpStep.APPLY),
                        str(OpStatus.RUNNING), json.dumps(detail or {}, sort_keys=True), now,
                        now))
        got = self.get(oid)
        assert got is not None
        return got

    def begin(self, op_id: str, step: OpStep, detail: dict[str, Any] | None = None) -> None:
        """Record that `step` is about to act, merging `detail` into the op's detail."""
        with self.journal.tx() as db:
            row = db.execute("SELECT detail FROM delta_ops WHERE id = ?", (op_id,)).fetchone()
            merged = {**json.loads(row["detail"]), **(detail or {}), "began": str(step)}
            db.execute("UPDATE delta_ops SET step = ?, detail = ?, updated_at = ? WHERE id = ?",
                       (str(step), json.dumps(merged, sort_keys=True), time.time(), op_id))

    def move(self, op_id: str, step: OpStep, *, reason: str = "", code: str = "") -> None:
        """The current step ended: go on at `step` (a failure's reason kept for the end)."""
        with self.journal.tx() as db:
            db.execute("UPDATE delta_ops SET step = ?, updated_at = ?,"
                       " reason = CASE WHEN ? != '' THEN ? ELSE reason END,"
                       " reason_code = CASE WHEN ? != '' THEN ? ELSE reason_code END"
                       " WHERE id = ?", (str(step), time.time(), reason, reason, code, code,
                                         op_id))

    def finish(self, op: DeltaOp, status: OpStatus, *, reason: str = "", code: str = "",
               written_at: float | None = None, pause: tuple[Pause, str] | None = None) -> None:
        """End the operation; COMMITTED also moves the stream's committed seq to to_seq."""
        now = time.time()
        with self.journal.tx() as db:
            db.execute("UPDATE delta_ops SET step = ?, status = ?, updated_at = ?,"
                       " finished_at = ?, reason = CASE WHEN ? != '' THEN ? ELSE reason END,"
                       " reason_code = CASE WHEN ? != '' THEN ? ELSE reason_code END"
                       " WHERE id = ?", (str(OpStep.DONE), str(status), now, now, reason,
                                         reason, code, code, op.id))
            if status is OpStatus.COMMITTED:
                db.execute("UPDATE delta_streams SET committed_seq = ?, committed_at = ?,"
                           " written_at = ?, updated_at = ? WHERE model = ? AND version = ?",
                           (op.to_seq, now, written_at, now, op.model, op.version))
            if pause is not None:
                db.execute("UPDATE delta_streams SET paused = ?, pause_reason = ?,"
                           " updated_at = ? WHERE model = ?",
                           (str(pause[0]), pause[1], now, op.model))

    def get(self, op_id: str) -> DeltaOp | None:
        rows = self.journal.query("SELECT * FROM delta_ops WHERE id = ?", (op_id,))
        return _op(rows[0]) if rows else None

    def running(self, model: str | None = None) -> list[DeltaOp]:
        q, args = "SELECT * FROM delta_ops WHERE status = 'running'", tuple[str, ...]()
        if model is not None:
            q, args = q + " AND model = ?", (model,)
        return [_op(r) for r in self.journal.query(q + " ORDER BY created_at", args)]

    def recent(self, model: str, limit: int = 10) -> list[DeltaOp]:
        return [_op(r) for r in self.journal.query(
            "SELECT * FROM delta_ops WHERE model = ? ORDER BY created_at DESC, rowid DESC"
            " LIMIT ?", (model, limit))]


def _stream(r: Any) -> Stream:
    return Stream(r["model"], r["version"], r["committed_seq"], r["committed_at"],
                  r["written_at"], r["paused"], r["pause_reason"], r["updated_at"])


def _op(r: Any) -> DeltaOp:
    return DeltaOp(r["id"], r["model"], r["version"], r["kind"], r["from_seq"], r["to_seq"],
                   OpStep(r["step"]), OpStatus(r["status"]), r["reason"], r["reason_code"],
                   json.loads(r["detail"]), r["created_at"], r["updated_at"], r["finished_at"])

"""The durable rollout journal: SQLite in WAL mode, fsynced on every commit.

Two tables. `rollouts` holds one row per rollout with its *current* step (the step
to run next, or the one running); `events` is append-only: a `begin` row before a
step acts on the fleet, an `end` row (with its outcome) after, plus `resume`,
`recover` and `abort` notes. A step's `end` row and the move of the rollout to its
next step commit in one transaction, so after a crash the rollout row alone says
where to go on, and the last event says whether the current step had started.

At most one active rollout per model: checked and inserted in one IMMEDIATE
transaction, and backed by a partial unique index, so two controllers sharing a
journal cannot both start one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy_controller.rollout import Event as Event
from deploy_controller.rollout import Rollout as Rollout
from deploy_controller.rollout import row_to_rollout
from deploy_controller.state import (
    FIRST,
    Kind,
    Outcome,
    Phase,
    Status,
    Step,
    Strategy,
    status_for,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    from_version TEXT NOT NULL,
    to_version TEXT NOT NULL,
    canary TEXT NOT NULL,            -- JSON list of percentages
    bake_s REAL NOT NULL,
    status TEXT NOT NULL,            -- state.Status
    step TEXT NOT NULL,              -- current step name (state.Step.name)
    reason TEXT NOT NULL DEFAULT '', -- why it rolled back / failed
    reason_code TEXT NOT NULL DEFAULT '',
    abort_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_rollout_per_model
    ON rollouts(model) WHERE status IN ('running', 'rolling_back');
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    step TEXT NOT NULL,
    event TEXT NOT NULL,             -- begin | end | resume | recover | abort
    outcome TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',  -- JSON
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_rollout ON events(rollout_id, seq);
-- Delta streams (delta_journal.py): per model the version whose deltas it follows and the
-- committed seq; per operation (advance | revert) its current step, like a rollout's.
CREATE TABLE IF NOT EXISTS delta_streams (
    model TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    committed_seq INTEGER NOT NULL DEFAULT 0,
    committed_at REAL,
    written_at REAL,                  -- the committed delta's manifest written_at
    paused TEXT NOT NULL DEFAULT '',  -- '' following | operator | refused | gate | failed
    pause_reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS delta_ops (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    kind TEXT NOT NULL,               -- advance | revert
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    step TEXT NOT NULL,               -- delta_journal.OpStep
    status TEXT NOT NULL,             -- running | committed | rolled_back | failed
    reason TEXT NOT NULL DEFAULT '',
    reason_code TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',  -- JSON: the current step's begin detail
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_running_delta_op_per_model
    ON delta_ops(model) WHERE status = 'running';
"""


# Added to `rollouts` after its first release (so also to journals written before):
# state.Strategy, and the JSON of bluegreen.Plan (forward path, waves, why).
_ADDED_COLUMNS = {"strategy": "TEXT NOT NULL DEFAULT 'in_place'",
                  "plan": "TEXT NOT NULL DEFAULT '{}'"}


class ModelBusyError(Exception):
    """Another operation (a rollout or a delta advance) is acting on this model."""


class ActiveRolloutError(ModelBusyError):
    """A rollout of this model is already running; `rollout_id` names it."""

    def __init__(self, model: str, rollout_id: str) -> None:
        super().__init__(f"model {model!r} already has an active rollout {rollout_id}")
        self.model = model
        self.rollout_id = rollout_id


class Journal:
    """Thread-safe access to the journal file; every write is one committed transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed step survives power loss, not just a process kill.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        cols = {r["name"] for r in self._db.execute("PRAGMA table_info(rollouts)")}
        for col, decl in _ADDED_COLUMNS.items():  # journals written before these existed
            if col not in cols:
                self._db.execute(f"ALTER TABLE rollouts ADD COLUMN {col} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def tx(self) -> _Tx:
        """One IMMEDIATE transaction under the journal's lock (delta_journal.py's writes)."""
        return _Tx(self)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read under the journal's lock."""
        with self._lock:
            return list(self._db.execute(sql, tuple(args)).fetchall())

    # ------------------------------------------------------------------ writes

    def create(self, model: str, from_version: str, to_version: str, canary: Sequence[int],
               bake_s: float, strategy: Strategy = Strategy.IN_PLACE,
               plan: dict[str, Any] | None = None) -> Rollout:
        """Insert a new running rollout; ActiveRolloutError if the model has one."""
        rid = "r-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self.tx() as db:
            row = db.execute(
                "SELECT id FROM rollouts WHERE model = ? AND status IN ('running', 'rolling_back')",
                (model,)).fetchone()
            if row is not None:
                raise ActiveRolloutError(model, row["id"])
            op = db.execute("SELECT id, kind, to_seq FROM delta_ops WHERE model = ? AND "
                            "status = 'running'", (model,)).fetchone()
            if op is not None:
                raise ModelBusyError(f"model {model!r} has a delta {op['kind']} to seq "
                                     f"{op['to_seq']} running ({op['id']}); retry when it ends")
            db.execute(
                "INSERT INTO rollouts (id, model, from_version, to_version, canary, bake_s, status,"
                " step, strategy, plan, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rid, model, from_version, to_version, json.dumps(list(canary)), float(bake_s),
                 str(Status.RUNNING), Step(FIRST).name, str(strategy),
                 json.dumps(plan or {}, sort_keys=True), now, now))
        got = self.get(rid)
        assert got is not None
        return got

    def begin(self, rollout_id: str, step: Step, detail: dict[str, Any] | None = None) -> None:
        """Record that `step` is about to act on the fleet."""
        with self.tx() as db:
            self._event(db, rollout_id, step.name, "begin", "", detail)

    def end(self, rollout_id: str, step: Step, outcome: Outcome, nxt: Step, *,
            reason: str = "", reason_code: str = "", detail: dict[str, Any] | None = None) -> None:
        """Record `step`'s outcome and move the rollout to `nxt`, atomically."""
        now = time.time()
        with self.tx() as db:
            self._event(db, rollout_id, step.name, "end", str(outcome), detail)
            sets = "step = ?, status = ?, updated_at = ?"
            args: list[Any] = [nxt.name, str(status_for(nxt)), now]
            if reason:
                # The first failure is the reason; a failing rollback step keeps it visible.
                sets += (", reason = CASE WHEN reason = '' THEN ?"
                         " ELSE reason || '; then: ' || ? END"
                         ", reason_code = CASE WHEN reason_code = '' THEN ?"
                         " ELSE reason_code END")
                args += [reason, reason, reason_code]
            if nxt.terminal:
                sets += ", finished_at = ?"
                args.append(now)
            db.execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*args, rollout_id))
            if nxt.terminal and (nxt.kind is Kind.SUCCEEDED or step.phase is Phase.RETIRE):
                _restart_stream(db, rollout_id, now)

    def note(self, rollout_id: str, step: Step, event: str,
             detail: dict[str, Any] | None = None) -> None:
        """Append a non-step event (resume, recover decisions)."""
        with self.tx() as db:
            self._event(db, rollout_id, step.name, event, "", detail)

    def request_abort(self, rollout_id: str, reason: str) -> None:
        """Persist an abort request so that a restart still honours it."""
        with self.tx() as db:
            row = db.execute("SELECT step FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise KeyError(rollout_id)
            db.execute("UPDATE rollouts SET abort_requested = 1, updated_at = ? WHERE id = ?",
                       (time.time(), rollout_id))
            self._event(db, rollout_id, row["step"], "abort", "", {"reason": reason})

    @staticmethod
    def _event(db: sqlite3.Connection, rollout_id: str, step: str, event: str, outcome: str,
               detail: dict[str, Any] | None) -> None:
        db.execute(
            "INSERT INTO events (rollout_id, step, event, outcome, detail, ts)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (rollout_id, step, event, outcome, json.dumps(detail or {}, sort_keys=True),
             time.time()))

    # ------------------------------------------------------------------ reads

    def get(self, rollout_id: str, *, events: bool = True) -> Rollout | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            evs = self._events(rollout_id) if row is not None and events else []
        return row_to_rollout(row, evs) if row is not None else None

    def active(self, model: str | None = None) -> list[Rollout]:
        q = "SELECT * FROM rollouts WHERE status IN ('running', 'rolling_back')"
        args: tuple[str, ...] = ()
        if model is not None:
            q += " AND model = ?"
            args = (model,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY created_at", args).fetchall()
            return [row_to_rollout(r, self._events(r["id"])) for r in rows]

    def history(self, model: str | None = None, limit: int = 50) -> list[Rollout]:
        q = "SELECT * FROM rollouts"
        args: list[Any] = []
        if model is not None:
            q += " WHERE model = ?"
            args.append(model)
        q += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(int(limit))
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [row_to_rollout(r, []) for r in rows]

    def events(self, rollout_id: str) -> list[Event]:
        with self._lock:
            return self._events(rollout_id)

    def _events(self, rollout_id: str) -> list[Event]:
        return _events(self._db, rollout_id)


def read_rollouts(path: Path) -> list[Rollout]:
    """Every rollout with its events, oldest first, from a journal opened read-only.

    For reports beside a running controller: no lock, no WAL writes, no schema changes.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM rollouts ORDER BY created_at, rowid").fetchall()
        return [row_to_rollout(r, _events(db, r["id"])) for r in rows]
    finally:
        db.close()


def _restart_stream(db: sqlite3.Connection, rollout_id: str, now: float) -> None:
    """The rollout's new version now serves everything: its delta stream starts at seq 0.

    In the transaction that ends the rollout, so a crash cannot leave the new version
    paired with the old one's committed seq. An operator's pause outlives the rollout.
    """
    r = db.execute("SELECT model, to_version FROM rollouts WHERE id = ?",
                   (rollout_id,)).fetchone()
    db.execute(
        "INSERT INTO delta_streams (model, version, committed_seq, updated_at) VALUES (?, ?, 0, ?)"
        " ON CONFLICT(model) DO UPDATE SET version = excluded.version, committed_seq = 0,"
        " committed_at = NULL, written_at = NULL, updated_at = excluded.updated_at,"
        " paused = CASE WHEN paused = 'operator' THEN paused ELSE '' END,"
        " pause_reason = CASE WHEN paused = 'operator' THEN pause_reason ELSE '' END",
        (r["model"], r["to_version"], now))


def _events(db: sqlite3.Connection, rollout_id: str) -> list[Event]:
    rows = db.execute("SELECT * FROM events WHERE rollout_id = ? ORDER BY seq",
                      (rollout_id,)).fetchall()
    return [Event(r["seq"], r["step"], r["event"], r["outcome"], json.loads(r["detail"]), r["ts"])
            for r in rows]


class _Tx:
    """`with journal.tx() as db:` one IMMEDIATE transaction under the journal's lock."""

    def __init__(self, journal: Journal) -> None:
        self._j = journal

    def __enter__(self) -> sqlite3.Connection:
        self._j._lock.acquire()
        try:
            self._j._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._j._lock.release()
            raise
        return self._j._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._j._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self._j._lock.release()

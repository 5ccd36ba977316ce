"""The SQLite journal: durability, atomic step ends, one active rollout per model."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from deploy_controller.journal import ActiveRolloutError, Journal
from deploy_controller.state import Kind, Outcome, Status, Step


def test_wal_mode_and_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    r = j.create("m", "v1", "v2", [5, 100], 1.5)
    j.begin(r.id, Step(Kind.LOAD_DENSE), {"x": 1})
    j.end(r.id, Step(Kind.LOAD_DENSE), Outcome.OK, Step(Kind.CHECK_FIT))
    j.close()
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    j2 = Journal(path)
    got = j2.get(r.id)
    assert got is not None
    assert (got.model, got.from_version, got.to_version, got.canary, got.bake_s) == (
        "m", "v1", "v2", [5, 100], 1.5)
    assert got.step == Step(Kind.CHECK_FIT) and got.status is Status.RUNNING
    assert [(e.step, e.event, e.outcome) for e in got.events] == [
        ("load_dense", "begin", ""), ("load_dense", "end", "ok")]
    assert got.events[0].detail == {"x": 1}
    assert got.events[0].ts <= got.events[1].ts


def test_second_active_rollout_of_a_model_is_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    r = j.create("m", "v1", "v2", [100], 0)
    with pytest.raises(ActiveRolloutError) as e:
        j.create("m", "v1", "v3", [100], 0)
    assert e.value.rollout_id == r.id
    j.create("other", "v1", "v2", [100], 0)  # another model is fine
    j.end(r.id, Step(Kind.UNLOAD_OLD_SHARDS), Outcome.OK, Step(Kind.SUCCEEDED))
    assert j.create("m", "v2", "v3", [100], 0).status is Status.RUNNING


def test_partial_unique_index_backs_the_check(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    j.create("m", "v1", "v2", [100], 0)
    db = sqlite3.connect(tmp_path / "j.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO rollouts (id, model, from_version, to_version, canary, bake_s,"
                   " status, step, created_at, updated_at) VALUES"
                   " ('x', 'm', 'v1', 'v3', '[100]', 0, 'running', 'load_dense', 0, 0)")


def test_two_journals_racing_admit_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    Journal(path).close()
    results: list[str] = []
    barrier = threading.Barrier(4)

    def go(i: int) -> None:
        j = Journal(path)
        barrier.wait()
        try:
            j.create("m", "v1", f"v{i + 2}", [100], 0)
            results.append("ok")
        except ActiveRolloutError:
            results.append("409")
        j.close()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["409", "409", "409", "ok"]


def test_end_moves_status_reason_and_finish_time(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    r = j.create("m", "v1", "v2", [100], 0)
    j.end(r.id, Step(Kind.PREPARE), Outcome.FAILED, Step(Kind.ROLLBACK_TRAFFIC),
          reason="prepare: shard 1 not ready", reason_code="prepare_failed")
    got = j.get(r.id)
    assert got is not None and got.status is Status.ROLLING_BACK and got.active
    assert got.reason_code == "prepare_failed" and got.finished_at is None
    j.end(r.id, Step(Kind.UNLOAD_NEW_SHARDS), Outcome.FAILED, Step(Kind.FAILED),
          reason="unload_new_shards: unreachable", reason_code="rollback_failed")
    got = j.get(r.id)
    assert got is not None and got.status is Status.FAILED and not got.active
    assert got.reason_code == "prepare_failed", "the first cause stays the reason code"
    assert "prepare: shard 1" in got.reason and "then: unload_new_shards" in got.reason
    assert got.finished_at is not None
    assert j.active() == []


def test_abort_request_is_persisted(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    r = j.create("m", "v1", "v2", [100], 0)
    j.request_abort(r.id, "bad numbers")
    got = Journal(tmp_path / "j.sqlite").get(r.id)
    assert got is not None and got.abort_requested
    assert got.events[-1].event == "abort" and got.events[-1].detail == {"reason": "bad numbers"}
    with pytest.raises(KeyError):
        j.request_abort("nope", "x")


def test_history_newest_first_and_filtered(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    ids = []
    for i in range(3):
        r = j.create("m", f"v{i}", f"v{i + 1}", [100], 0)
        j.end(r.id, Step(Kind.UNLOAD_OLD_SHARDS), Outcome.OK, Step(Kind.SUCCEEDED))
        ids.append(r.id)
    j.create("n", "a", "b", [100], 0)
    assert [r.id for r in j.history("m")] == ids[::-1]
    assert len(j.history()) == 4 and len(j.history(limit=2)) == 2
    assert [r.model for r in j.active()] == ["n"]
    assert j.get("missing") is None
    js = j.history("m")[0].to_json()
    assert js["status"] == "succeeded" and js["phase"] == "done"

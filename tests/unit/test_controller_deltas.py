"""Delta streams over the in-memory fleet and a real tiny store: order, refusals, gate,
revert, pause/resume, crash recovery, rollouts restarting the stream, reconcile."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from deploy_controller.config import ControllerConfig
from deploy_controller.controller import Controller
from deploy_controller.delta_journal import DeltaJournal, DeltaOp, OpStatus, OpStep, Pause
from deploy_controller.errors import ControllerError
from deploy_controller.fake import Behavior, FakeFleet
from deploy_controller.journal import Journal, ModelBusyError
from deploy_controller.metrics import ControllerMetrics
from modelpack import desired
from modelpack.delta_write import write_delta
from tests.helpers_store import tiny_version
from tests.unit.controller_helpers import FAST
from tests.unit.delta_helpers import update

CFG = replace(FAST, delta_poll_s=0.0, delta_gate_s=0.03, gate_interval_s=0.01,
              reconcile_interval_s=0.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    for v in ("v1", "v2"):
        tiny_version(store, v, model="m")
    return store


@dataclass
class Env:
    store: Path
    journal_path: Path
    cfg: ControllerConfig
    fleet: FakeFleet
    rng: np.random.Generator

    def write(self, n: int = 1, version: str = "v1") -> None:
        for _ in range(n):
            write_delta(self.store / "m" / version, {"unified": update(self.rng)})

    def controller(self, **cfg: object) -> Controller:
        c = replace(self.cfg, **cfg)  # type: ignore[arg-type]
        return Controller(c, Journal(self.journal_path), self.fleet, ControllerMetrics())

    def ranker_seqs(self) -> set[int]:
        return {r.seqs.get("v1", 0) for r in self.fleet.rankers.values()}


@pytest.fixture
def env(built: Path, tmp_path: Path) -> Iterator[Env]:
    store = tmp_path / "store"
    shutil.copytree(built, store)
    cfg = replace(CFG, store=store, journal=tmp_path / "journal.sqlite",
                  desired_state=tmp_path / "desired.json")
    yield Env(store, cfg.journal, cfg, FakeFleet(), np.random.default_rng(0))


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _started(c: Controller) -> Controller:
    await c.start()
    return c


async def _advance(c: Controller, to: int | None = None) -> DeltaOp:
    """Advance the stream of m and wait until the operation ends."""
    return await c.deltas.wait((await c.deltas.advance("m", to)).id)


def test_advance_applies_every_replica_before_any_ranker_moves(env: Env) -> None:
    env.write(3)

    async def go() -> None:
        c = await _started(env.controller())
        op = await c.deltas.advance("m")
        done = await c.deltas.wait(op.id)
        assert done.status is OpStatus.COMMITTED and (done.from_seq, done.to_seq) == (0, 3)
        ops = [op for op, _ in env.fleet.calls if op in ("shard_apply_deltas", "ranker_set_seq")]
        first_ranker = ops.index("ranker_set_seq")
        assert ops[:first_ranker] == ["shard_apply_deltas"] * 4  # 2 shards x 2 replicas
        assert "shard_apply_deltas" not in ops[first_ranker:]
        assert env.ranker_seqs() == {3} and env.fleet.violations == []
        assert all(h["v1"].readable_seqs == (0, 3) for h in env.fleet.shards.values())
        st = await c.deltas.status("m")
        assert (st["committed_seq"], st["newest_seq"], st["state"]) == (3, 3, "manual")
        assert 0 <= st["freshness_lag_s"] < 60
        assert [r["seq"] for r in st["rankers"]] == [3, 3]
        assert desired.read(env.cfg.desired_state_path())["m"].deltas == {"v1": 3}
        with pytest.raises(ControllerError, match="nothing to advance"):
            await c.deltas.advance("m")
        await c.stop()

    run(go())


def test_refused_delta_pauses_the_stream_at_the_last_good_seq(env: Env) -> None:
    env.write(3)
    data = env.store / "m/v1/deltas/3/tables/unified/rows.int4"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0xFF
    data.write_bytes(bytes(raw))

    async def go() -> None:
        c = await _started(env.controller())
        (op,) = await c.deltas.follow_once()  # the follower advances to the last good seq
        assert (await c.deltas.wait(op.id)).to_seq == 2
        assert await c.deltas.follow_once() == []  # then pauses on delta 3's refusal
        st = c.deltas.dj.stream("m")
        assert st is not None and (st.committed_seq, st.paused) == (2, Pause.REFUSED)
        assert "m/v1 delta 3" in st.pause_reason and "corrupt" in st.pause_reason
        assert env.ranker_seqs() == {2}
        with pytest.raises(ControllerError, match="delta 3"):
            await c.deltas.advance("m", to=3)
        await c.stop()

    run(go())


def test_a_shards_refusal_pauses_before_any_ranker_moves(env: Env) -> None:
    env.write(2)
    env.fleet.refuse[2] = "m/v1 delta 2: table 'unified' row 5 has a NaN fp16 scale/bias"

    async def go() -> None:
        c = await _started(env.controller())
        done = await _advance(c)
        assert done.status is OpStatus.FAILED and done.reason_code == "delta_refused"
        st = c.deltas.dj.stream("m")
        assert st is not None and st.paused == Pause.REFUSED and "NaN" in st.pause_reason
        assert st.committed_seq == 0
        assert ("ranker_set_seq", "http://ranker-0") not in env.fleet.calls
        await c.stop()

    run(go())


def test_gate_failure_moves_rankers_back_and_pauses(env: Env) -> None:
    env.write(2)

    async def go() -> None:
        c = await _started(env.controller())
        assert (await _advance(c, 1)).to_seq == 1
        env.fleet.behavior_at_seq[2] = Behavior(error_rate=0.5)
        done = await _advance(c)
        assert done.status is OpStatus.ROLLED_BACK and done.reason_code == "gate_error_rate"
        st = c.deltas.dj.stream("m")
        assert st is not None and (st.committed_seq, st.paused) == (1, Pause.GATE)
        assert env.ranker_seqs() == {1} and env.fleet.violations == []
        assert c.metrics.delta_advances.labels("gate_failed")._value.get() == 1
        # Fixed: resume and advance again; replicas were realigned on 1, so 1 stays readable.
        env.fleet.behavior_at_seq.clear()
        await c.deltas.resume("m")
        assert (await _advance(c)).status is OpStatus.COMMITTED
        assert env.ranker_seqs() == {2} and env.fleet.violations == []
        await c.stop()

    run(go())


def test_revert_pauses_and_resume_follows_again(env: Env) -> None:
    env.write(3)

    async def go() -> None:
        c = await _started(env.controller())
        await _advance(c)
        with pytest.raises(ControllerError, match="delta advance --to 4"):
            await c.deltas.revert("m", 4)
        done = await c.deltas.wait((await c.deltas.revert("m", 1, "bad rows")).id)
        assert done.status is OpStatus.COMMITTED and done.kind == "revert"
        assert env.ranker_seqs() == {1} and env.fleet.violations == []
        st = c.deltas.dj.stream("m")
        assert st is not None and (st.committed_seq, st.paused) == (1, Pause.OPERATOR)
        assert "bad rows" in st.pause_reason
        assert desired.read(env.cfg.desired_state_path())["m"].deltas == {"v1": 1}
        assert await c.deltas.follow_once() == []  # paused: no re-advance by itself
        await c.deltas.resume("m")
        (op,) = await c.deltas.follow_once()
        assert (await c.deltas.wait(op.id)).to_seq == 3 and env.ranker_seqs() == {3}
        await c.deltas.pause("m", "looking")
        env.write()
        assert await c.deltas.follow_once() == []
        await c.stop()

    run(go())


class SimulatedCrash(BaseException):
    """Stands in for SIGKILL: escapes every handler, leaves the journal as written."""


def _crash(point: str) -> None:
    raise SimulatedCrash(point)


async def _crash_then_restart(env: Env, point: str, **cfg: object) -> tuple[Controller, str]:
    """Advance until the journal write `point` "kills" the controller, then start a fresh
    one (new journal handle, same fleet) that recovers it; (that controller, op id)."""
    c = env.controller(crash_at=point)
    c.executor._crash = _crash
    await c.start()
    op = await c.deltas.advance("m")
    left = await c.deltas.wait(op.id)
    assert left.status is OpStatus.RUNNING
    await c.stop()
    c.journal.close()
    return await _started(env.controller(**cfg)), op.id


@pytest.mark.parametrize("point", ["delta_apply:begin", "delta_rankers:begin",
                                   "delta_gate:begin", "delta_gate:end", "delta_commit:begin"])
def test_crash_mid_advance_resumes_on_restart(env: Env, point: str) -> None:
    env.write(2)

    async def go() -> None:
        again, op_id = await _crash_then_restart(env, point)
        done = await again.deltas.wait(op_id)
        assert done.status is OpStatus.COMMITTED and env.ranker_seqs() == {2}
        assert env.fleet.violations == []
        await again.stop()

    run(go())


def test_crash_with_rankers_moved_long_ago_reverts_them(env: Env) -> None:
    env.write(1)

    async def go() -> None:
        again, op_id = await _crash_then_restart(env, "delta_gate:begin", max_unsupervised_s=0.0)
        done = await again.deltas.wait(op_id)
        assert done.status is OpStatus.ROLLED_BACK and done.reason_code == "resume_unsafe"
        assert env.ranker_seqs() == {0} and env.fleet.violations == []
        await again.stop()

    run(go())


def test_rollout_restarts_the_stream_at_the_new_versions_seq_0(env: Env) -> None:
    env.write(2)

    async def go() -> None:
        c = await _started(env.controller())
        await _advance(c)
        r = await c.create("m", "v2", [100], 0.0)
        with pytest.raises(ControllerError, match="active rollout"):
            await c.deltas.advance("m")
        assert (await c.wait(r.id)).status == "succeeded"
        want = desired.read(env.cfg.desired_state_path())["m"]
        assert want.active == "v2" and want.deltas == {}
        env.write(1, version="v2")
        (op,) = await c.deltas.follow_once()
        done = await c.deltas.wait(op.id)
        assert (done.version, done.from_seq, done.to_seq) == ("v2", 0, 1)
        assert {r.seqs.get("v2") for r in env.fleet.rankers.values()} == {1}
        await c.stop()

    run(go())


def test_one_operation_per_model(env: Env) -> None:
    journal = Journal(env.journal_path)
    dj = DeltaJournal(journal)
    dj.ensure("m", "v1")
    op = dj.start("m", "v1", "advance", 0, 1)
    with pytest.raises(ModelBusyError, match="delta advance"):
        journal.create("m", "v1", "v2", [100], 0.0)
    with pytest.raises(ModelBusyError, match="already has a delta"):
        dj.start("m", "v1", "advance", 0, 2)
    dj.finish(op, OpStatus.FAILED)
    journal.create("m", "v1", "v2", [100], 0.0)
    with pytest.raises(ModelBusyError, match="active rollout"):
        dj.start("m", "v1", "advance", 0, 1)
    assert dj.get(op.id) is not None and dj.get(op.id).step is OpStep.DONE  # type: ignore[union-attr]


def test_reconcile_brings_a_restarted_replica_and_ranker_to_the_committed_seq(env: Env) -> None:
    env.write(2)

    async def go() -> None:
        c = await _started(env.controller())
        await _advance(c)
        addr = env.fleet.shard_addrs[1][0]
        sv = env.fleet.shards[addr]["v1"]
        env.fleet.shards[addr]["v1"] = replace(sv, readable_seqs=(0,), applied_seq=0)
        env.fleet.rankers["http://ranker-1"].seqs["v1"] = 0
        p = await c.reconciler.run_once()
        assert any("shard_seq" in x or "seq 2" in x for x in p.repairs), p
        assert 2 in env.fleet.shards[addr]["v1"].readable_seqs and env.ranker_seqs() == {2}
        await c.stop()

    run(go())


def test_freshness_and_committed_seq_metrics(env: Env) -> None:
    env.write(1)

    async def go() -> None:
        c = await _started(env.controller())
        await _advance(c)
        from prometheus_client import generate_latest

        text = generate_latest(c.metrics.registry).decode()
        assert 'deploy_delta_committed_seq{model="m"} 1.0' in text
        assert 'deploy_delta_advances_total{outcome="committed"} 1.0' in text
        lag = next(line for line in text.splitlines()
                   if line.startswith("deploy_delta_freshness_lag_seconds{"))
        assert 0 <= float(lag.split()[-1]) < time.time()
        await c.stop()

    run(go())

"""Continuous repair of servers that drifted from the desired state.

Servers read the desired-state file at startup and converge on their own; this loop
covers what that cannot: a server started without the file (or before the controller
wrote it), a version lost by hand, a ranker whose prepare kept failing. Every few
seconds it compares every shard replica's ListVersions and every ranker's
/admin/v1/versions with the desired state and asks only for what is missing:
LoadVersion on a replica, load + prepare + activate/split on a ranker, and the committed
delta seq (ApplyDeltas on a replica that cannot read it, then the ranker's seq). It never
unloads anything (retire and rollback steps do that, journaled).

During a blue/green rollout a replica holds what the plan says it holds at the current
step (`replicas(model)`, desired.replica_holds), not every desired version: one that came
back from a restart holding the other version is converted (the version it should not
hold is unloaded, only while another replica of its shard still holds it, then the one
it should is loaded), and the rankers' prepare accepts one replica per shard.

It must not fight a rollout: the executor holds the model's lock while a step acts on
the fleet (every step but a bake), and a pass takes the same lock, so a pass and a
step never run at once; during a bake the desired state already is the bake's split.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploy_controller.fleet import Fleet, RankerStatus, ShardVersion
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.tasks import Periodic
from modelpack.desired import DesiredModel

log = logging.getLogger(__name__)


@dataclass
class Pass:
    """One reconcile pass, as `deployctl status` and the API show it."""

    at: float = 0.0
    duration_s: float = 0.0
    drift: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # models a rollout step was acting on

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "duration_s": round(self.duration_s, 3), "drift": self.drift,
                "repairs": self.repairs, "errors": self.errors, "skipped": self.skipped}


def _split_is(st: RankerStatus, want: dict[str, float]) -> bool:
    have = {v: s for v, s in st.split.items() if s > 0}
    want = {v: s for v, s in want.items() if s > 0}
    return have.keys() == want.keys() and all(abs(have[v] - want[v]) < 1e-6 for v in want)


class Reconciler:
    def __init__(self, fleet: Fleet, desired: Callable[[], dict[str, DesiredModel]],
                 locks: Callable[[str], asyncio.Lock], metrics: ControllerMetrics,
                 interval_s: float, refresh: Callable[[], object] | None = None,
                 replicas: Callable[[str], dict[str, tuple[str, ...]] | None] = lambda m: None
                 ) -> None:
        self.fleet = fleet
        self.replicas = replicas
        self.desired = desired
        self.refresh = refresh  # called first in every pass (retries a failed publish)
        self.locks = locks
        self.metrics = metrics
        self.interval_s = interval_s
        self.last: Pass | None = None
        self.passes = 0
        self._loop = Periodic("reconcile", self.run_once, interval_s)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def view(self) -> dict[str, Any] | None:
        """The last pass (None before the first) plus the loop's settings."""
        if self.last is None:
            return None
        return {**self.last.to_json(), "interval_s": self.interval_s, "passes": self.passes}

    async def run_once(self) -> Pass:
        p = Pass(at=time.time())
        t0 = time.monotonic()
        if self.refresh is not None:
            self.refresh()
        wanted = self.desired()
        if wanted:
            try:
                topo = await self.fleet.topology()
            except Exception as e:
                p.errors.append(f"discovery: {e}")
            else:
                for model in sorted(wanted):
                    lock = self.locks(model)
                    if lock.locked():
                        p.skipped.append(model)
                        continue
                    async with lock:
                        # Read again under the lock: a step may have moved it meanwhile.
                        want = self.desired().get(model)
                        if want is None:
                            continue
                        holds = self.replicas(model)
                        if holds is None:
                            await self._shards(p, model, want, [a for _, a in topo.replicas()])
                        else:
                            await self._convert(p, model, holds, topo.shards)
                        await self._rankers(p, model, want, list(topo.rankers), holds is not None)
        p.duration_s = time.monotonic() - t0
        self.last, self.passes = p, self.passes + 1
        self.metrics.reconcile_passes.labels("error" if p.errors else "drift" if p.drift
                                             else "ok").inc()
        self.metrics.reconcile_last.set(p.at)
        if p.drift or p.errors:
            log.warning("reconcile: drift %s; repairs %s; errors %s", p.drift, p.repairs,
                        p.errors)
        return p

    def _repaired(self, p: Pass, kind: str, what: str) -> None:
        p.repairs.append(what)
        self.metrics.reconcile_repairs.labels(kind).inc()

    def _failed(self, p: Pass, what: str, e: Exception) -> None:
        p.errors.append(f"{what}: {e}")
        self.metrics.reconcile_errors.inc()

    async def _shards(self, p: Pass, model: str, want: DesiredModel, addrs: list[str]) -> None:
        async def one(addr: str) -> None:
            try:
                held = {v.version: v for v in await self.fleet.shard_versions(addr, model)}
            except Exception as e:
                self._failed(p, f"shard {addr}", e)
                return
            for v in want.versions:
                sv = held.get(v)
                if sv is not None and sv.state == "ready":
                    await self._seq(p, addr, model, v, sv, want.delta_seq(v))
                    continue
                if sv is not None and sv.state == "loading":
                    continue  # loading: its own LoadVersion (startup or a step) finishes it
                p.drift.append(f"shard {addr} lacks {model}/{v}"
                               + (f" ({sv.state})" if sv is not None else ""))
                try:
                    got = await self.fleet.shard_load(addr, model, v)
                except Exception as e:
                    self._failed(p, f"LoadVersion {model}/{v} on {addr}", e)
                    continue
                if got.state == "ready":
                    self._repaired(p, "shard_load", f"loaded {model}/{v} on shard {addr}")
                else:
                    p.errors.append(f"LoadVersion {model}/{v} on {addr}: {got.state} "
                                    f"{got.error}")

        await asyncio.gather(*(one(a) for a in addrs))

    async def _convert(self, p: Pass, model: str, holds: dict[str, tuple[str, ...]],
                       shards: tuple[tuple[str, ...], ...]) -> None:
        """Blue/green: each replica toward what the plan has it hold (see the docstring)."""
        addrs = [a for reps in shards for a in reps]
        got = await asyncio.gather(*(self.fleet.shard_versions(a, model) for a in addrs),
                                   return_exceptions=True)
        ready = {a: {v.version for v in vs if v.state == "ready"}
                 for a, vs in zip(addrs, got, strict=True) if not isinstance(vs, BaseException)}
        for reps in shards:
            for a in reps:
                if a not in ready or a not in holds or set(holds[a]) <= ready[a]:
                    continue
                p.drift.append(f"shard {a} holds {sorted(ready[a])}, the plan {list(holds[a])}")
                try:
                    for v in sorted(ready[a] - set(holds[a])):
                        if any(v in ready.get(b, ()) for b in reps if b != a):
                            await self.fleet.shard_unload(a, model, v, 30.0)
                            ready[a].discard(v)
                    for v in holds[a]:
                        if v not in ready[a] and (await self.fleet.shard_load(
                                a, model, v)).state == "ready":
                            ready[a].add(v)
                            self._repaired(p, "shard_load", f"loaded {model}/{v} on shard {a}")
                except Exception as e:
                    self._failed(p, f"converting shard {a} to {list(holds[a])}", e)

    async def _seq(self, p: Pass, addr: str, model: str, version: str, sv: ShardVersion,
                   seq: int) -> None:
        """A replica that cannot read the committed delta seq applies it (deltas 1..seq)."""
        if seq in sv.readable_seqs:
            return
        p.drift.append(f"shard {addr} reads {model}/{version} at {list(sv.readable_seqs)}, "
                       f"committed seq {seq}")
        try:
            await self.fleet.shard_apply_deltas(addr, model, version, seq, "")
        except Exception as e:
            self._failed(p, f"ApplyDeltas {model}/{version} seq {seq} on {addr}", e)
            return
        self._repaired(p, "shard_seq", f"applied {model}/{version} seq {seq} on shard {addr}")

    async def _rankers(self, p: Pass, model: str, want: DesiredModel, urls: list[str],
                       any_replica: bool = False) -> None:
        async def one(url: str) -> None:
            try:
                st = await self.fleet.ranker_status(url)
            except Exception as e:
                self._failed(p, f"ranker {url}", e)
                return
            if st.model != model:
                return
            try:
                for v in want.versions:
                    if st.get(v) is None:
                        p.drift.append(f"ranker {url} lacks {model}/{v}")
                        await self.fleet.ranker_load(url, v)
                        self._repaired(p, "ranker_load", f"loaded {v} on ranker {url}")
                    if not st.servable(v):
                        p.drift.append(f"ranker {url}: {v} not prepared")
                        await self.fleet.ranker_prepare(url, v, any_replica)
                        self._repaired(p, "ranker_prepare", f"prepared {v} on ranker {url}")
                    held = st.get(v)
                    if held is not None and held.seq != want.delta_seq(v):
                        p.drift.append(f"ranker {url} reads {v} at seq {held.seq}, committed "
                                       f"{want.delta_seq(v)}")
                        await self.fleet.ranker_set_seq(url, v, want.delta_seq(v))
                        self._repaired(p, "ranker_seq", f"seq {want.delta_seq(v)} of {v} on "
                                       f"ranker {url}")
                if not _split_is(st, want.split) or st.active is None:
                    p.drift.append(f"ranker {url} splits {st.split}, desired {want.split}")
                    if len(want.split) == 1:
                        await self.fleet.ranker_activate(url, want.active)
                    else:
                        await self.fleet.ranker_split(url, want.split)
                    self._repaired(p, "ranker_split", f"split {want.split} on ranker {url}")
            except Exception as e:
                self._failed(p, f"ranker {url}", e)

        await asyncio.gather(*(one(u) for u in urls))

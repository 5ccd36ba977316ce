"""What each step does to the fleet. Every action is idempotent: it first looks at what
the servers hold and only asks for what is missing, so re-running a step after a crash
(or a retry) converges to the same state. Fan-out to every ranker and every shard
replica happens here; the per-server calls go through `Fleet`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import Topology
from deploy_controller.fleet import Fleet, FleetError, RankerStatus, ShardVersion
from deploy_controller.gates import Scrape, parse_metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

BLUE_GREEN_NOTE = ("two versions of the tables do not fit one embedding server: roll out "
                   "with --strategy blue-green (or auto), which moves one replica per shard "
                   "at a time (needs >= 2 replicas per shard), or free memory")


class StepFailed(Exception):
    """The step could not reach its goal; `code` becomes the rollback reason label."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Aborted(Exception):
    """An operator asked to stop while the step was running."""


@dataclass
class Ctx:
    """What a step needs: the fleet, the config and the rollout's versions."""

    fleet: Fleet
    cfg: ControllerConfig
    model: str
    old: str
    new: str
    canary: list[int]
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abortable: bool = True
    topology: Topology = field(default_factory=lambda: Topology((), ()))
    rankers: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)  # a blue/green rollout's (bluegreen.py)

    @property
    def blue_green(self) -> bool:
        return self.plan.get("strategy") == "blue_green"

    def check_abort(self) -> None:
        if self.abortable and self.abort.is_set():
            raise Aborted()


async def call(ctx: Ctx, code: str, fn: Callable[[], Awaitable[T]], *,
               by_reason: bool = False) -> T:
    """One server call, retried with backoff while its failure is retryable.

    by_reason: a failure the server gave a reason for (delta_refused, ...) fails the step
    with that reason as its code instead of `code`.
    """
    delay = ctx.cfg.retry_backoff_s
    for attempt in range(1, ctx.cfg.step_attempts + 1):
        try:
            return await fn()
        except FleetError as e:
            if not e.retryable or attempt == ctx.cfg.step_attempts:
                raise StepFailed(e.reason if by_reason and e.reason else code, str(e)) from None
            log.warning("retrying after %s (attempt %d of %d)", e, attempt, ctx.cfg.step_attempts)
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


async def discover(ctx: Ctx) -> dict[str, RankerStatus]:
    """Refresh the topology and find this model's rankers; returns their statuses."""
    try:
        ctx.topology = await ctx.fleet.topology()
    except Exception as e:  # discovery errors of any kind fail the step, not the process
        raise StepFailed("discovery", f"discovery failed: {e}") from None
    statuses = await asyncio.gather(*(call(ctx, "ranker_unreachable",
                                           lambda u=u: ctx.fleet.ranker_status(u))  # type: ignore[misc]
                                      for u in ctx.topology.rankers))
    mine = {u: s for u, s in zip(ctx.topology.rankers, statuses, strict=True)
            if s.model == ctx.model}
    if not mine:
        raise StepFailed("discovery", f"no ranker serves model {ctx.model!r}")
    ctx.rankers = list(mine)
    return mine


async def scrape_rankers(ctx: Ctx) -> dict[str, Scrape]:
    """Every ranker's /metrics (of ctx.rankers, found by discover), parsed for the gates."""
    texts = await asyncio.gather(*(call(ctx, "metrics_unavailable",
                                        lambda u=u: ctx.fleet.ranker_metrics(u))  # type: ignore[misc]
                                   for u in ctx.rankers))
    try:
        return {u: parse_metrics(t) for u, t in zip(ctx.rankers, texts, strict=True)}
    except ValueError as e:
        raise StepFailed("metrics_unavailable", f"unparsable /metrics: {e}") from None


async def _replicas(ctx: Ctx, code: str, fn: Callable[[str], Awaitable[T]]) -> list[T]:
    return list(await asyncio.gather(*(call(ctx, code, lambda a=a: fn(a))  # type: ignore[misc]
                                       for _, a in ctx.topology.replicas())))


async def _held(ctx: Ctx) -> dict[str, dict[str, ShardVersion]]:
    """addr -> {version: ShardVersion} over every replica."""
    lists = await _replicas(ctx, "shard_unreachable",
                            lambda a: ctx.fleet.shard_versions(a, ctx.model))
    return {a: {v.version: v for v in vs}
            for (_, a), vs in zip(ctx.topology.replicas(), lists, strict=True)}


async def load_dense(ctx: Ctx) -> dict[str, Any]:
    statuses = await discover(ctx)
    for url, st in statuses.items():
        ctx.check_abort()
        if st.get(ctx.new) is None:
            await call(ctx, "ranker_load_failed", lambda u=url: ctx.fleet.ranker_load(u, ctx.new))  # type: ignore[misc]
    statuses = await discover(ctx)
    missing = [u for u, st in statuses.items() if st.get(ctx.new) is None]
    if missing:
        raise StepFailed("ranker_load_failed", f"{ctx.new} not loaded on {', '.join(missing)}")
    return {"rankers": len(statuses)}


async def fit_report(ctx: Ctx) -> tuple[list[str], list[str]]:
    """Replicas where the new version does not fit beside the old one, and those where it
    does not fit even alone (CheckFit's available bytes plus what the old one takes)."""
    await discover(ctx)
    held = await _held(ctx)
    beside, alone = [], []
    for k, addr in ctx.topology.replicas():
        if ctx.new in held[addr]:
            continue  # already loaded (a resumed rollout): nothing more to fit
        fit = await call(ctx, "shard_unreachable",
                         lambda a=addr: ctx.fleet.shard_check_fit(a, ctx.model, ctx.new))  # type: ignore[misc]
        if fit.fits:
            continue
        beside.append(f"shard {k} replica {addr}: {ctx.model}/{ctx.new} needs "
                      f"{fit.required_bytes} bytes beside {ctx.old}, {fit.available_bytes} "
                      "available" + (f" ({fit.reason})" if fit.reason else ""))
        old = held[addr].get(ctx.old)
        freed = old.bytes + old.overlay_bytes if old is not None else 0
        if fit.required_bytes > fit.available_bytes + freed:
            alone.append(f"shard {k} replica {addr}: needs {fit.required_bytes} bytes, "
                         f"{fit.available_bytes + freed} with {ctx.old} unloaded")
    return beside, alone


async def check_fit(ctx: Ctx) -> dict[str, Any]:
    beside, _ = await fit_report(ctx)
    if beside:
        raise StepFailed("does_not_fit", "; ".join(beside) + "; " + BLUE_GREEN_NOTE)
    return {"replicas": sum(len(r) for r in ctx.topology.shards)}


async def load_embeddings(ctx: Ctx) -> dict[str, Any]:
    await discover(ctx)
    held = await _held(ctx)

    async def one(addr: str) -> ShardVersion:
        sv = held[addr].get(ctx.new)
        if sv is None or sv.state == "failed":
            sv = await ctx.fleet.shard_load(addr, ctx.model, ctx.new)
        return sv

    loaded = await _replicas(ctx, "shard_load_failed", one)
    ctx.check_abort()
    bad = [f"{a}: {sv.state}{' (' + sv.error + ')' if sv.error else ''}"
           for (_, a), sv in zip(ctx.topology.replicas(), loaded, strict=True)
           if sv.state != "ready"]
    if bad:
        raise StepFailed("shard_load_failed",
                         f"{ctx.model}/{ctx.new} did not load: {'; '.join(bad)}")
    prints = {sv.fingerprint for sv in loaded}
    if len(prints) != 1:
        raise StepFailed("fingerprint_mismatch",
                         f"replicas loaded {ctx.new} with different fingerprints {sorted(prints)}")
    return {"replicas": len(loaded), "fingerprint": prints.pop()}


async def prepare(ctx: Ctx) -> dict[str, Any]:
    statuses = await discover(ctx)
    for url, st in statuses.items():
        ctx.check_abort()
        if not st.servable(ctx.new):
            await call(ctx, "prepare_failed", lambda u=url: ctx.fleet.ranker_prepare(  # type: ignore[misc]
                u, ctx.new, ctx.blue_green))
    statuses = await discover(ctx)
    bad = [u for u, st in statuses.items() if not st.servable(ctx.new)]
    if bad:
        raise StepFailed("prepare_failed", f"{ctx.new} not prepared on {', '.join(bad)}")
    return {"rankers": len(statuses)}


def split_for(ctx: Ctx, index: int) -> dict[str, float]:
    share = ctx.canary[index] / 100.0
    return {ctx.new: 1.0} if share >= 1.0 else {ctx.old: round(1.0 - share, 6),
                                                ctx.new: round(share, 6)}


def _split_matches(st: RankerStatus, want: dict[str, float]) -> bool:
    have = {v: s for v, s in st.split.items() if s > 0}
    return have.keys() == want.keys() and all(abs(have[v] - want[v]) < 1e-6 for v in want)


async def shift(ctx: Ctx, index: int) -> dict[str, Any]:
    statuses = await discover(ctx)
    want = split_for(ctx, index)
    for url, st in statuses.items():
        ctx.check_abort()
        if _split_matches(st, want) and (len(want) > 1 or st.active == ctx.new):
            continue
        if len(want) == 1:
            await call(ctx, "shift_failed", lambda u=url: ctx.fleet.ranker_activate(u, ctx.new))  # type: ignore[misc]
        else:
            await call(ctx, "shift_failed", lambda u=url: ctx.fleet.ranker_split(u, want))  # type: ignore[misc]
    return {"split": want}


async def _unload_rankers(ctx: Ctx, version: str, code: str) -> dict[str, Any]:
    statuses = await discover(ctx)
    for url, st in statuses.items():
        if st.get(version) is not None:
            await call(ctx, code, lambda u=url: ctx.fleet.ranker_unload(  # type: ignore[misc]
                u, version, ctx.cfg.ranker_unload_timeout_s))
    statuses = await discover(ctx)
    left = [u for u, st in statuses.items() if st.get(version) is not None]
    if left:
        raise StepFailed(code, f"{version} still held by {', '.join(left)}")
    return {"rankers": len(statuses)}


async def _unload_shards(ctx: Ctx, version: str, code: str) -> dict[str, Any]:
    # Rankers dropped the version in the step before (so nothing can look it up now),
    # and the shard still drains its own in-flight lookups before unmapping.
    await discover(ctx)
    held = await _held(ctx)

    async def one(addr: str) -> None:
        if version in held[addr]:
            await ctx.fleet.shard_unload(addr, ctx.model, version, ctx.cfg.shard_drain_timeout_s)

    await _replicas(ctx, code, one)
    return {"replicas": len(held)}


async def unload_old_rankers(ctx: Ctx) -> dict[str, Any]:
    return await _unload_rankers(ctx, ctx.old, "retire_failed")


async def unload_old_shards(ctx: Ctx) -> dict[str, Any]:
    return await _unload_shards(ctx, ctx.old, "retire_failed")


async def rollback_traffic(ctx: Ctx) -> dict[str, Any]:
    statuses = await discover(ctx)
    for url, st in statuses.items():
        if st.active == ctx.old and _split_matches(st, {ctx.old: 1.0}):
            continue
        if not st.servable(ctx.old):
            # Only if the ranker restarted without it; the shards still hold it.
            if st.get(ctx.old) is None:
                await call(ctx, "rollback_failed", lambda u=url: ctx.fleet.ranker_load(u, ctx.old))  # type: ignore[misc]
            await call(ctx, "rollback_failed", lambda u=url: ctx.fleet.ranker_prepare(  # type: ignore[misc]
                u, ctx.old, ctx.blue_green))
        await call(ctx, "rollback_failed", lambda u=url: ctx.fleet.ranker_activate(u, ctx.old))  # type: ignore[misc]
    return {"split": {ctx.old: 1.0}}


async def unload_new_rankers(ctx: Ctx) -> dict[str, Any]:
    return await _unload_rankers(ctx, ctx.new, "rollback_failed")


async def unload_new_shards(ctx: Ctx) -> dict[str, Any]:
    return await _unload_shards(ctx, ctx.new, "rollback_failed")


async def snapshot(ctx: Ctx) -> dict[str, Any]:
    """Best-effort view of every server for progress displays (never raises)."""
    out: dict[str, Any] = {"rankers": {}, "shards": []}
    for url in ctx.rankers or list(ctx.topology.rankers):
        try:
            out["rankers"][url] = (await ctx.fleet.ranker_status(url)).to_json()
        except Exception as e:  # a display must not fail a rollout
            out["rankers"][url] = {"error": str(e)}
    for k, reps in enumerate(ctx.topology.shards):
        row = {}
        for addr in reps:
            try:
                row[addr] = {v.version: v.state for v in
                             await ctx.fleet.shard_versions(addr, ctx.model)}
            except Exception as e:
                row[addr] = {"error": str(e)}
        out["shards"].append({"shard": k, "replicas": row})
    return out

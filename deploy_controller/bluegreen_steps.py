"""What the blue/green steps do to the fleet (the plan and its rule: bluegreen.py).

Every action is idempotent like those of steps.py: it lists what each replica holds and
asks only for what is missing, so a step re-run after a crash converges. A replica is
converted by UnloadVersion of the version it drops (the shard drains that version's
in-flight lookups; the clients' version-aware routing sends new ones to the replicas that
still hold it) and LoadVersion of the one it takes, verified READY with the fingerprint
the other holders have. The capacity rule is checked over what the replicas really hold
(READY) before a replica stops serving the old version and before every shift.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from deploy_controller import steps
from deploy_controller.bluegreen import load_factor, shards_of, waves
from deploy_controller.fleet import ShardVersion
from deploy_controller.state import Kind, Step
from deploy_controller.steps import Ctx, StepFailed, call, discover

log = logging.getLogger(__name__)


def _shards(ctx: Ctx) -> tuple[tuple[str, ...], ...]:
    """The plan's shards, checked against what discovery lists now."""
    planned = shards_of(ctx.plan)
    now = tuple(tuple(reps) for reps in ctx.topology.shards)
    if sorted(map(sorted, planned)) != sorted(map(sorted, now)):
        raise StepFailed("topology_changed", f"the plan was made for replicas {planned}, "
                         f"discovery lists {now}: roll back and plan again")
    return planned


async def _ready(ctx: Ctx) -> dict[str, dict[str, ShardVersion]]:
    """addr -> {version: ShardVersion} of this model (every state)."""
    addrs = [a for _, a in ctx.topology.replicas()]
    lists = await asyncio.gather(*(call(ctx, "shard_unreachable",
                                        lambda a=a: ctx.fleet.shard_versions(a, ctx.model))  # type: ignore[misc]
                                   for a in addrs))
    return {a: {v.version: v for v in vs} for a, vs in zip(addrs, lists, strict=True)}


def _holds(held: dict[str, dict[str, ShardVersion]]) -> dict[str, tuple[str, ...]]:
    return {a: tuple(v for v, sv in h.items() if sv.state == "ready") for a, h in held.items()}


def _split(ctx: Ctx, statuses: dict[str, Any]) -> dict[str, float]:
    """The largest share any ranker gives each version (the load the rule must carry)."""
    out: dict[str, float] = {}
    for st in statuses.values():
        for v, s in st.split.items():
            out[v] = max(out.get(v, 0.0), s)
    return out


def _check(ctx: Ctx, shards: tuple[tuple[str, ...], ...], holds: dict[str, tuple[str, ...]],
           split: dict[str, float], what: str) -> dict[str, float]:
    limit = float(ctx.plan.get("max_load", ctx.cfg.bluegreen_max_load))
    out = {}
    for v in (ctx.old, ctx.new):
        f, k = load_factor(shards, holds, split, v)
        out[v] = round(f, 3) if math.isfinite(f) else -1.0
        if f > limit:
            raise StepFailed("capacity", f"{what}: {v} would carry "
                             + (f"{f:.2f}x its steady load per replica on shard {k}"
                                if math.isfinite(f) else f"traffic with no replica of shard {k}")
                             + f" (limit bluegreen_max_load {limit:g})")
    return out


async def _move(ctx: Ctx, addr: str, held: dict[str, ShardVersion], drop: str, take: str
                ) -> ShardVersion:
    """One replica: unload `drop` (drains), then load `take` unless it is READY already."""
    if drop in held:
        await call(ctx, "convert_failed", lambda: ctx.fleet.shard_unload(
            addr, ctx.model, drop, ctx.cfg.shard_drain_timeout_s))
        log.info("replica %s dropped %s/%s", addr, ctx.model, drop)
    sv = held.get(take)
    if sv is None or sv.state != "ready":
        if sv is not None and sv.state == "failed":  # a failed load keeps its slot: clear it
            await call(ctx, "convert_failed", lambda: ctx.fleet.shard_unload(
                addr, ctx.model, take, ctx.cfg.shard_drain_timeout_s))
        sv = await call(ctx, "convert_failed",
                        lambda: ctx.fleet.shard_load(addr, ctx.model, take))
        log.info("replica %s loaded %s/%s: %s", addr, ctx.model, take, sv.state)
    return sv


def _verify(take: str, got: dict[str, ShardVersion],
            held: dict[str, dict[str, ShardVersion]]) -> str:
    bad = [f"{a}: {sv.state}{' (' + sv.error + ')' if sv.error else ''}"
           for a, sv in got.items() if sv.state != "ready"]
    if bad:
        raise StepFailed("convert_failed", f"{take} did not load: {'; '.join(bad)}")
    prints = {sv.fingerprint for sv in got.values()} | {
        h[take].fingerprint for h in held.values() if take in h and h[take].state == "ready"}
    if len(prints) > 1:
        raise StepFailed("fingerprint_mismatch",
                         f"replicas hold {take} with different fingerprints {sorted(prints)}")
    return prints.pop() if prints else ""


async def _convert(ctx: Ctx, wave: int, *, gate: bool) -> dict[str, Any]:
    """Wave `wave` drops the old version and takes the new; gate: check capacity first."""
    statuses = await discover(ctx)
    shards = _shards(ctx)
    held = await _ready(ctx)
    todo = [a for a in waves(shards)[wave]
            if ctx.old in held[a] or held[a].get(ctx.new, None) is None
            or held[a][ctx.new].state != "ready"]
    loads: dict[str, float] = {}
    if gate and todo:
        after = {**_holds(held), **{a: (ctx.new,) for a in todo}}
        loads = _check(ctx, shards, after, _split(ctx, statuses), f"convert:{wave}")
    ctx.check_abort()
    got = await asyncio.gather(*(_move(ctx, a, held[a], ctx.old, ctx.new) for a in todo))
    fp = _verify(ctx.new, dict(zip(todo, got, strict=True)), held)
    return {"wave": wave, "converted": todo, "load": loads, "fingerprint": fp}


def _waves_before(ctx: Ctx, step: Step) -> list[int]:
    """The waves the plan converts before `step` (its path is the journaled one)."""
    path = list(ctx.plan.get("steps", ()))
    at = path.index(step.name) if step.name in path else len(path)
    return [Step.parse(n).index for n in path[:at] if n.startswith(f"{Kind.CONVERT}:")]


async def _ensure(ctx: Ctx, step: Step) -> None:
    """Re-assert the waves converted before `step` (a replica restarted since may have
    come back holding the old version; converting it again is the plan's truth)."""
    for w in _waves_before(ctx, step):
        await _convert(ctx, w, gate=True)


async def check_plan(ctx: Ctx) -> dict[str, Any]:
    """Every shard has >= 2 replicas (the plan's), and the new version fits each alone."""
    await discover(ctx)
    shards = _shards(ctx)
    if min(len(r) for r in shards) < 2:
        raise StepFailed("does_not_fit", f"blue/green needs >= 2 replicas per shard: {shards}")
    _, alone = await steps.fit_report(ctx)
    if alone:
        raise StepFailed("does_not_fit", f"{ctx.model}/{ctx.new} does not fit a replica "
                         f"even alone: {'; '.join(alone)}")
    return {"replicas": sum(len(r) for r in shards), "waves": len(waves(shards))}


async def convert(ctx: Ctx, wave: int) -> dict[str, Any]:
    await _ensure(ctx, Step(Kind.CONVERT, wave))
    return await _convert(ctx, wave, gate=True)


async def prepare(ctx: Ctx) -> dict[str, Any]:
    await _ensure(ctx, Step(Kind.PREPARE))
    return await steps.prepare(ctx)


async def shift(ctx: Ctx, index: int) -> dict[str, Any]:
    """The capacity rule over what the replicas hold now, then the in-place shift."""
    await _ensure(ctx, Step(Kind.SHIFT, index))
    await discover(ctx)
    want = steps.split_for(ctx, index)
    loads = _check(ctx, _shards(ctx), _holds(await _ready(ctx)), want, f"shift:{index}")
    return {**await steps.shift(ctx, index), "load": loads}


async def convert_rest(ctx: Ctx) -> dict[str, Any]:
    """Retire: the rankers dropped the old version; every replica left converts, wave by
    wave (forward only, like every retire step)."""
    await discover(ctx)
    done: list[str] = []
    for w in range(len(waves(_shards(ctx)))):
        done += (await _convert(ctx, w, gate=False))["converted"]
    return {"converted": done}


async def revert_replicas(ctx: Ctx) -> dict[str, Any]:
    """Rollback: the rankers dropped the new version; every replica holding it (or holding
    neither, a crash mid-convert) takes the old one back, last wave first."""
    await discover(ctx)
    shards = _shards(ctx)
    reverted: list[str] = []
    for wave in reversed(waves(shards)):
        held = await _ready(ctx)
        todo = [a for a in wave if ctx.new in held[a] or ctx.old not in held[a]
                or held[a][ctx.old].state != "ready"]
        got = await asyncio.gather(*(_move(ctx, a, held[a], ctx.new, ctx.old) for a in todo))
        _verify(ctx.old, dict(zip(todo, got, strict=True)), held)
        reverted += todo
    return {"reverted": reverted}

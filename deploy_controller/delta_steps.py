"""What a delta operation does to the fleet: apply on every replica, move every ranker, gate.

Like steps.py, every action first looks at what the servers hold and asks only for what
is missing, so re-running one after a crash converges. Order is the whole point: rankers
move to seq t only after every replica of every shard confirmed it can read t, and the
seq rankers read now stays readable meanwhile (each replica keeps its most recently
applied seqs readable), so no lookup ever names a seq a replica cannot serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from deploy_controller import steps
from deploy_controller.config import ControllerConfig
from deploy_controller.fleet import ShardVersion
from deploy_controller.gates import (
    GateResult,
    GateTracker,
    Scrape,
    Verdict,
    evaluate,
    stats,
    total,
    window,
)
from deploy_controller.steps import Ctx, StepFailed

log = logging.getLogger(__name__)


async def replicas(ctx: Ctx, version: str) -> dict[str, ShardVersion | None]:
    """addr -> the replica's state of `version` (None: not held) over every replica."""
    addrs = [a for _, a in ctx.topology.replicas()]
    lists = await asyncio.gather(*(steps.call(
        ctx, "shard_unreachable", lambda a=a: ctx.fleet.shard_versions(a, ctx.model))  # type: ignore[misc]
        for a in addrs))
    return {a: next((v for v in vs if v.version == version), None)
            for a, vs in zip(addrs, lists, strict=True)}


async def apply(ctx: Ctx, version: str, seq: int, fingerprint: str, keep: int
                ) -> dict[str, Any]:
    """Every replica of every shard can read `version` at `seq`, confirmed by listing.

    `keep` is the seq the rankers read now: a replica whose newest applied seq is another
    one (after a revert) re-applies `keep` first, so that applying `seq` leaves both
    readable.
    """
    await steps.discover(ctx)
    held = await replicas(ctx, version)

    async def one(addr: str) -> None:
        sv = held[addr]
        if sv is None or sv.state != "ready":
            raise StepFailed("version_not_loaded", f"replica {addr} does not hold "
                             f"{ctx.model}/{version} ready")
        if seq in sv.readable_seqs and sv.applied_seq == seq:
            return
        todo = [(seq, fingerprint)]
        if keep != seq and sv.applied_seq != keep:
            todo.insert(0, (keep, ""))  # after a revert: `keep` newest, so it stays readable
        for s, fp in todo:
            await steps.call(ctx, "apply_failed", lambda s=s, fp=fp: ctx.fleet.shard_apply_deltas(  # type: ignore[misc]
                addr, ctx.model, version, s, fp), by_reason=True)

    await asyncio.gather(*(one(a) for a in held))
    after = await replicas(ctx, version)
    missing = [f"{a} reads {sv.readable_seqs if sv else 'nothing'}"
               for a, sv in after.items() if sv is None or seq not in sv.readable_seqs]
    if missing:
        raise StepFailed("not_readable", f"{ctx.model}/{version} seq {seq} not readable on "
                         + "; ".join(missing))
    dropped = [a for a, sv in after.items() if sv is not None and keep not in sv.readable_seqs]
    if dropped:  # rankers at `keep` now fail over or fail there: moving them on is the cure
        log.warning("%s/%s seq %d (rankers' seq) no longer readable on %s after applying %d",
                    ctx.model, version, keep, ", ".join(dropped), seq)
    return {"replicas": len(after), **({"dropped_keep": dropped} if dropped else {})}


async def set_rankers(ctx: Ctx, version: str, seq: int, fingerprint: str = "") -> dict[str, Any]:
    """Every ranker of the model reads `version` at `seq`, confirmed by listing (each
    ranker checks delta `seq`'s fingerprint in its own store when one is given)."""
    statuses = await steps.discover(ctx)
    for url, st in statuses.items():
        v = st.get(version)
        if v is None:
            raise StepFailed("ranker_lacks_version", f"ranker {url} does not hold {version}")
        if v.seq != seq:
            await steps.call(ctx, "ranker_seq_failed", lambda u=url: ctx.fleet.ranker_set_seq(  # type: ignore[misc]
                u, version, seq, fingerprint))
    statuses = await steps.discover(ctx)
    off = [f"{u} at {v.seq}" for u, st in statuses.items()
           if (v := st.get(version)) is not None and v.seq != seq]
    if off:
        raise StepFailed("ranker_seq_failed", f"rankers not at seq {seq}: {', '.join(off)}")
    return {"rankers": len(statuses)}


def relabel(s: Scrape, version: str, label: str) -> Scrape:
    """`version`'s figures in `s` under the version label `label` (the rest dropped)."""
    return Scrape(requests={(label, c): n for (v, c), n in s.requests.items() if v == version},
                  buckets={(label, le): n for (v, le), n in s.buckets.items() if v == version},
                  mismatch=s.mismatch,
                  score_sum={label: s.score_sum[version]} if version in s.score_sum else {},
                  scores={label: s.scores[version]} if version in s.scores else {})


def pair(before: dict[str, Scrape], after: dict[str, Scrape]) -> Scrape:
    """The increase from `before` to `after`, summed over the rankers in `after`."""
    urls = list(after)
    return window([before.get(u, Scrape()) for u in urls], [after[u] for u in urls])


def previous(last: dict[str, Scrape], now: dict[str, Scrape], version: str, min_requests: int
             ) -> Scrape:
    """What the previous seq served: the interval since the last operation ended, or the
    version's lifetime figures when that interval saw too few requests to judge."""
    w = pair(last, now)
    if stats(w, version).requests >= min_requests:
        return w
    return total(list(now.values()))


def judge(prev: Scrape, new: Scrape, version: str, old_seq: int, new_seq: int,
          cfg: ControllerConfig) -> GateResult:
    """gates.evaluate with the previous seq as the old side and the new seq as the new one."""
    old, cur = f"{version}@{old_seq}", f"{version}@{new_seq}"
    a, b = relabel(prev, version, old), relabel(new, version, cur)
    merged = Scrape({**a.requests, **b.requests}, {**a.buckets, **b.buckets}, b.mismatch,
                    {**a.score_sum, **b.score_sum}, {**a.scores, **b.scores})
    return evaluate([Scrape()], [merged], old, cur, cfg.gates)


async def gate(ctx: Ctx, version: str, old_seq: int, new_seq: int, prev: Scrape,
               baseline: dict[str, Scrape], started_at: float) -> dict[str, Any]:
    """Health gate over [started_at, started_at + delta_gate_s]; StepFailed if it fails.

    Each evaluation judges the interval since the one before (the first: since the
    journaled baseline, so time spent crashed is judged too), as a rollout's bake does.
    """
    cfg = ctx.cfg
    tracker = GateTracker(cfg.gate_fail_after, cfg.gate_max_failures)
    deadline = started_at + cfg.delta_gate_s
    while True:
        left = deadline - time.time()
        wait = min(cfg.gate_interval_s, left) if left > 0 else (
            0.0 if tracker.evaluations == 0 else cfg.gate_interval_s)
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.abort.wait(), wait)
        now = await steps.scrape_rankers(ctx)
        result = judge(prev, pair(baseline, now), version, old_seq, new_seq, cfg)
        baseline = now
        verdict = tracker.record(result)
        if verdict == Verdict.FAIL:
            code, message = tracker.reason()
            raise StepFailed(code, message)
        if verdict == Verdict.PASS and time.time() >= deadline:
            return {"evaluations": tracker.evaluations, "gate": result.detail}

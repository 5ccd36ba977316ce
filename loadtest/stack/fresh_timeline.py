"""The freshness scenario's arithmetic, apart from any server: served AUC over time, seq over
time, freshness lag per delta, answers checked against the (version, seq) they name.

An `Answer` is one /v1/rank request as the load driver saw it (loadtest/stack/fresh_load.py);
everything here is a pure function of answers, labels and times, so it is unit-tested
without a stack (tests/unit/test_fresh_timeline.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from loadtest.locust.served import auc

Scores = npt.NDArray[np.float32]


@dataclass(eq=False)
class Answer:
    """One request: when it went and came back (time.time()), to which ranker, what it said."""

    t_sent: float
    t_done: float
    ranker: int
    index: int
    """Position of the request in the eval set (its labels and offline scores)."""
    status: int
    """HTTP status; -1: no HTTP answer (`error` says why)."""
    version: str = ""
    seq: int = 0
    scores: Scores | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.version) and self.scores is not None


@dataclass(frozen=True)
class Phase:
    """A named stretch of the scenario, [start, end) in time.time() seconds."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Window:
    """Requests sent in [start, end): how many, served AUC, and the same requests' AUC had
    `baseline` scores been served (a paired comparison: the noise of which requests
    landed in the window cancels)."""

    start: float
    end: float
    requests: int
    served_auc: float
    baseline_auc: float
    seqs: tuple[int, ...]
    versions: tuple[str, ...]


@dataclass
class Check:
    """Answers compared with the offline scores of the (version, seq) each one names."""

    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    """One line per answer whose scores are not its (version, seq)'s (beyond `tol`)."""
    resolved: int = 0
    """Answers at seq >= 1 whose scores would NOT pass as seq - 1's: the check can tell
    neighbouring seqs apart for them."""
    at_positive_seq: int = 0


def phase_of(t: float, phases: Sequence[Phase]) -> str:
    for p in phases:
        if p.start <= t < p.end:
            return p.name
    return ""


def windows(answers: Sequence[Answer], labels: Sequence[npt.NDArray[np.float32]],
            baseline: Sequence[Scores], width_s: float, t0: float | None = None) -> list[Window]:
    """Served AUC in consecutive windows of `width_s` seconds (by send time), from the
    answers' own scores and the eval labels; `baseline[i]` are request i's scores under a
    fixed reference (static v1) for the paired AUC. Failed answers are left out."""
    if width_s <= 0:
        raise ValueError(f"window width must be > 0 s, got {width_s}")
    ok = sorted((a for a in answers if a.ok), key=lambda a: a.t_sent)
    if not ok:
        return []
    start = ok[0].t_sent if t0 is None else t0
    out: list[Window] = []
    bins: dict[int, list[Answer]] = {}
    for a in ok:
        bins.setdefault(int((a.t_sent - start) // width_s), []).append(a)
    for k in sorted(bins):
        rows = bins[k]
        y = np.concatenate([labels[a.index] for a in rows])
        served = np.concatenate([a.scores for a in rows if a.scores is not None])
        base = np.concatenate([baseline[a.index] for a in rows])
        out.append(Window(start + k * width_s, start + (k + 1) * width_s, len(rows),
                          auc(y, served), auc(y, base), tuple(sorted({a.seq for a in rows})),
                          tuple(sorted({a.version for a in rows}))))
    return out


def phase_auc(answers: Sequence[Answer], labels: Sequence[npt.NDArray[np.float32]],
              baseline: Sequence[Scores], phases: Sequence[Phase]) -> dict[str, dict[str, float]]:
    """Per phase: requests, failures, latency p50/p99 (ms), served AUC and the paired static
    baseline AUC of its answers."""
    out: dict[str, dict[str, float]] = {}
    for p in phases:
        sent = [a for a in answers if p.start <= a.t_sent < p.end]
        rows = [a for a in sent if a.ok]
        lat = np.array([a.t_done - a.t_sent for a in rows]) * 1000
        base = {"requests": len(sent), "failed": len(sent) - len(rows),
                "p50_ms": float(np.percentile(lat, 50)) if rows else math.nan,
                "p99_ms": float(np.percentile(lat, 99)) if rows else math.nan}
        if not rows:
            out[p.name] = {**base, "served_auc": math.nan, "baseline_auc": math.nan}
            continue
        y = np.concatenate([labels[a.index] for a in rows])
        out[p.name] = {
            **base,
            "served_auc": auc(y, np.concatenate([a.scores for a in rows if a.scores is not None])),
            "baseline_auc": auc(y, np.concatenate([baseline[a.index] for a in rows]))}
    return out


def first_serving(answers: Sequence[Answer], version: str, rankers: int
                  ) -> dict[int, list[tuple[float, int]]]:
    """Per ranker, its answers for `version` as (answer time, seq), in time order."""
    out: dict[int, list[tuple[float, int]]] = {r: [] for r in range(rankers)}
    for a in answers:
        if a.ok and a.version == version:
            out.setdefault(a.ranker, []).append((a.t_done, a.seq))
    for obs in out.values():
        obs.sort()
    return out


def freshness_lags(written: Mapping[int, float],
                   serving: Mapping[int, Sequence[tuple[float, int]]]) -> dict[int, float | None]:
    """Per delta seq s: from s being written until every ranker served it, in seconds.

    `written[s]` is delta s's write time; `serving[r]` is ranker r's (time, seq)
    observations in time order (answers, or admin polls). A ranker serves s from the first
    observation at a seq >= s (a controller may skip straight to a later seq). None when
    some ranker was never seen at s or later.
    """
    lags: dict[int, float | None] = {}
    for s, t_written in sorted(written.items()):
        reached: list[float] = []
        for obs in serving.values():
            t = next((t for t, seq in obs if seq >= s), None)
            if t is None:
                break
            reached.append(t)
        lags[s] = max(reached) - t_written if reached and len(reached) == len(serving) else None
    return lags


def check_answers(answers: Sequence[Answer], offline: Mapping[tuple[str, int], Mapping[int, Scores]],
                  tol: float) -> Check:
    """Compare every good answer with offline[(version, seq)][index] (its own (V, s)'s scores).

    An answer whose (version, seq) has no offline scores is a mismatch too: it names a
    seq that was never written. Answers at s >= 1 also count as `resolved` when
    offline[(V, s - 1)] exists and differs from the answer by more than `tol`.
    """
    c = Check()
    for a in answers:
        if not a.ok or a.scores is None:
            continue
        c.checked += 1
        own = offline.get((a.version, a.seq), {}).get(a.index)
        if own is None:
            c.mismatched.append(f"request {a.index} from ranker {a.ranker} names "
                                f"{a.version}@{a.seq}, which was never written")
            continue
        err = float(np.max(np.abs(own - a.scores))) if own.size else 0.0
        if own.shape != a.scores.shape or err > tol:
            c.mismatched.append(f"request {a.index} from ranker {a.ranker} at {a.version}@{a.seq}:"
                                f" scores differ from {a.version}@{a.seq}'s by {err:.2g} > {tol:g}")
        if a.seq >= 1:
            c.at_positive_seq += 1
            prev = offline.get((a.version, a.seq - 1), {}).get(a.index)
            if prev is not None and float(np.max(np.abs(prev - a.scores))) > tol:
                c.resolved += 1
    return c


def seq_series(answers: Sequence[Answer], version: str
               ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """(answer times, seqs) of `version`'s good answers, in time order: seq over time."""
    rows = sorted((a.t_done, a.seq) for a in answers if a.ok and a.version == version)
    return (np.array([t for t, _ in rows], dtype=np.float64),
            np.array([s for _, s in rows], dtype=np.int64))


def lag_summary(lags: Mapping[int, float | None]) -> dict[str, float | int | None]:
    """p50/p99/max of the lags (seconds) and how many deltas were never seen served."""
    vals = np.array([v for v in lags.values() if v is not None], dtype=np.float64)
    missing = sum(v is None for v in lags.values())
    if vals.size == 0:
        return {"deltas": len(lags), "never_served": missing, "p50_s": None, "p99_s": None,
                "max_s": None}
    p50, p99 = np.percentile(vals, [50, 99])
    return {"deltas": len(lags), "never_served": missing, "p50_s": round(float(p50), 3),
            "p99_s": round(float(p99), 3), "max_s": round(float(vals.max()), 3)}

"""Health gates between canary steps, read from the rankers' own Prometheus /metrics.

A gate evaluation compares two scrapes of every ranker: the previous one (at first,
the baseline journaled when the bake began) and a fresh one. Counters are cumulative,
so everything is judged on the increase over that interval (Prometheus `increase()`
semantics: a counter that went down was reset by a restart and counts from zero).
Four checks:

- error rate of the new version: 5xx responses / all responses (429 is load shedding,
  not a fault of the version);
- p99 latency of the new version vs the old, from histogram buckets;
- `ranker_version_mismatch_total` must not grow (fatal at once: never tolerated);
- mean score of the new version within a bound of the old's.

Once the new version has all traffic the old one gets no requests in the window, so
the old side falls back to its lifetime figures (the absolute counters). Too few
requests to judge is "inconclusive", which passes: an idle fleet must still deploy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "ranker_requests_total"
DURATION_BUCKET = "ranker_request_duration_seconds_bucket"
MISMATCH = "ranker_version_mismatch_total"
SCORE_SUM = "ranker_score_sum"
SCORES = "ranker_scores_total"


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the health gates."""

    max_error_rate: float = 0.01
    """Largest tolerated share of 5xx responses of the new version in a window."""
    max_p99_ratio: float = 1.5
    """New p99 may be at most this multiple of the old p99 ..."""
    p99_slack_s: float = 0.05
    """... plus this many seconds (keeps millisecond-scale noise from failing the gate)."""
    max_score_drift: float = 0.1
    """Largest tolerated |mean score new - mean score old|."""
    min_requests: int = 20
    """Fewer new-version requests than this in a window: rate/latency/drift inconclusive."""

    def validate(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.max_p99_ratio < 1.0:
            raise ValueError(f"max_p99_ratio must be >= 1, got {self.max_p99_ratio}")
        if self.p99_slack_s < 0 or self.max_score_drift < 0:
            raise ValueError("p99_slack_s and max_score_drift must be >= 0")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")


@dataclass
class Scrape:
    """The metrics one ranker exported at one moment, reduced to what the gates read."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (version, code)
    buckets: dict[tuple[str, float], float] = field(default_factory=dict)  # (version, le)
    mismatch: float = 0.0
    score_sum: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"requests": [[v, c, n] for (v, c), n in self.requests.items()],
                "buckets": [[v, le if math.isfinite(le) else "+Inf", n]
                            for (v, le), n in self.buckets.items()],
                "mismatch": self.mismatch, "score_sum": self.score_sum, "scores": self.scores}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Scrape:
        return cls(requests={(v, c): float(n) for v, c, n in d["requests"]},
                   buckets={(v, float(le)): float(n) for v, le, n in d["buckets"]},
                   mismatch=float(d["mismatch"]), score_sum=dict(d["score_sum"]),
                   scores=dict(d["scores"]))


def parse_metrics(text: str) -> Scrape:
    """Parse Prometheus text exposition; unknown families are ignored."""
    s = Scrape()
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            lab = smp.labels
            if smp.name == REQUESTS:
                key = (lab.get("version", ""), lab.get("code", ""))
                s.requests[key] = s.requests.get(key, 0.0) + smp.value
            elif smp.name == DURATION_BUCKET:
                bkey = (lab.get("version", ""), float(lab["le"]))
                s.buckets[bkey] = s.buckets.get(bkey, 0.0) + smp.value  # summed over outcome
            elif smp.name == MISMATCH:
                s.mismatch += smp.value
            elif smp.name == SCORE_SUM:
                v = lab.get("version", "")
                s.score_sum[v] = s.score_sum.get(v, 0.0) + smp.value
            elif smp.name == SCORES:
                v = lab.get("version", "")
                s.scores[v] = s.scores.get(v, 0.0) + smp.value
    return s


def _inc(after: float, before: float) -> float:
    return after - before if after >= before else after  # a reset counts from zero


def _delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: _inc(v, before.get(k, 0.0)) for k, v in after.items()}


def window(before: Sequence[Scrape], after: Sequence[Scrape]) -> Scrape:
    """Increase over the window, summed over rankers (paired by position)."""
    out = Scrape()
    for b, a in zip(before, after, strict=True):
        for attr in ("requests", "buckets", "score_sum", "scores"):
            acc: dict[Any, float] = getattr(out, attr)
            for k, v in _delta(getattr(b, attr), getattr(a, attr)).items():
                acc[k] = acc.get(k, 0.0) + v
        out.mismatch += _inc(a.mismatch, b.mismatch)
    return out


def total(scrapes: Sequence[Scrape]) -> Scrape:
    """Lifetime figures: the absolute counters summed over rankers."""
    return window([Scrape() for _ in scrapes], scrapes)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets {le: count}; None if empty."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    rank = q * buckets[les[-1]]
    prev_le, prev_n = 0.0, 0.0
    for le in les:
        n = buckets[le]
        if n >= rank:
            if math.isinf(le):
                return prev_le  # the highest finite bound, as Prometheus does
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


@dataclass(frozen=True)
class VersionStats:
    requests: float
    errors: float
    p99_s: float | None
    mean_score: float | None

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "p99_s": self.p99_s,
                "mean_score": self.mean_score}


def stats(s: Scrape, version: str) -> VersionStats:
    reqs = sum(n for (v, _), n in s.requests.items() if v == version)
    errs = sum(n for (v, c), n in s.requests.items() if v == version and c.startswith("5"))
    p99 = histogram_quantile(0.99, {le: n for (v, le), n in s.buckets.items() if v == version})
    count = s.scores.get(version, 0.0)
    mean = s.score_sum.get(version, 0.0) / count if count > 0 else None
    return VersionStats(reqs, errs, p99, mean)


@dataclass(frozen=True)
class GateFailure:
    code: str  # error_rate | latency | mismatch | score_drift | metrics_unavailable
    message: str
    fatal: bool = False  # fail the gate at once, no second chance


@dataclass(frozen=True)
class GateResult:
    failures: tuple[GateFailure, ...]
    detail: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.failures


def evaluate(before: Sequence[Scrape], after: Sequence[Scrape], old: str, new: str,
             cfg: GateConfig) -> GateResult:
    """Judge the window between two scrapes of every ranker."""
    w = window(before, after)
    n, o = stats(w, new), stats(w, old)
    if o.requests < cfg.min_requests:
        o = stats(total(after), old)
    fails: list[GateFailure] = []
    if w.mismatch > 0:
        fails.append(GateFailure("mismatch", f"version_mismatch_total grew by {w.mismatch:g}",
                                 fatal=True))
    enough = n.requests >= cfg.min_requests
    if enough and n.errors / n.requests > cfg.max_error_rate:
        fails.append(GateFailure(
            "error_rate", f"{new}: {n.errors:g} of {n.requests:g} requests failed "
            f"({n.errors / n.requests:.2%} > {cfg.max_error_rate:.2%})"))
    if enough and n.p99_s is not None and o.p99_s is not None:
        limit = o.p99_s * cfg.max_p99_ratio + cfg.p99_slack_s
        if n.p99_s > limit:
            fails.append(GateFailure(
                "latency", f"{new}: p99 {n.p99_s * 1e3:.1f} ms > {limit * 1e3:.1f} ms "
                f"({old} p99 {o.p99_s * 1e3:.1f} ms x {cfg.max_p99_ratio:g} + "
                f"{cfg.p99_slack_s * 1e3:.0f} ms)"))
    if enough and n.mean_score is not None and o.mean_score is not None:
        drift = abs(n.mean_score - o.mean_score)
        if drift > cfg.max_score_drift:
            fails.append(GateFailure(
                "score_drift", f"mean score {new} {n.mean_score:.4f} vs {old} "
                f"{o.mean_score:.4f}: drift {drift:.4f} > {cfg.max_score_drift:g}"))
    detail = {"new": n.to_json(), "old": o.to_json(), "mismatch": w.mismatch,
              "conclusive": enough}
    return GateResult(tuple(fails), detail)


class Verdict:
    CONTINUE = "continue"
    PASS = "pass"
    FAIL = "fail"


@dataclass
class GateTracker:
    """Turns a series of gate evaluations during one bake into a verdict.

    A single failing evaluation is tolerated (a blip: one slow scrape window), but
    `fail_after` failures in a row fail the bake, and so does a gate that flaps:
    `max_failures` failures in total, however spread out. A fatal failure (version
    mismatch) fails at once. The bake only passes on a passing evaluation.
    """

    fail_after: int = 2
    max_failures: int = 3
    consecutive: int = 0
    failures: int = 0
    evaluations: int = 0
    last: GateResult | None = None

    def record(self, result: GateResult) -> str:
        self.evaluations += 1
        self.last = result
        if result.ok:
            self.consecutive = 0
            return Verdict.PASS
        self.consecutive += 1
        self.failures += 1
        if any(f.fatal for f in result.failures) or self.consecutive >= self.fail_after:
            return Verdict.FAIL
        if self.failures >= self.max_failures:
            return Verdict.FAIL
        return Verdict.CONTINUE

    def reason(self) -> tuple[str, str]:
        """(code, message) of the failure that ended the bake."""
        assert self.last is not None and self.last.failures
        f = self.last.failures[0]
        flapping = (not f.fatal and self.consecutive < self.fail_after
                    and self.failures >= self.max_failures)
        if flapping:
            return "gate_flapping", (f"gate flapping: failed {self.failures} of "
                                     f"{self.evaluations} evaluations; last: {f.message}")
        return "gate_" + f.code, "; ".join(x.message for x in self.last.failures)

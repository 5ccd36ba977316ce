"""Health gates: parsing real Prometheus text, windows, quantiles, each check, flapping."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deploy_controller.gates import (
    GateConfig,
    GateFailure,
    GateResult,
    GateTracker,
    Scrape,
    Verdict,
    evaluate,
    histogram_quantile,
    parse_metrics,
    window,
)


class Ranker:
    """A prometheus_client registry shaped like the ranker's /metrics."""

    def __init__(self) -> None:
        self.reg = CollectorRegistry()
        self.req = Counter("ranker_requests", "", ["version", "code"], registry=self.reg)
        self.dur = Histogram("ranker_request_duration_seconds", "", ["version", "outcome"],
                             registry=self.reg)
        self.mm = Counter("ranker_version_mismatch", "", registry=self.reg)
        self.ssum = Gauge("ranker_score_sum", "", ["version"], registry=self.reg)
        self.sn = Counter("ranker_scores", "", ["version"], registry=self.reg)
        Counter("ranker_errors", "", ["reason"], registry=self.reg).labels("x").inc()

    def serve(self, version: str, n: int, *, errors: int = 0, latency: float = 0.01,
              score: float = 0.1) -> None:
        if n - errors:
            self.req.labels(version, "200").inc(n - errors)
        if errors:
            self.req.labels(version, "503").inc(errors)
        for _ in range(n):
            self.dur.labels(version, "ok").observe(latency)
        self.ssum.labels(version).inc(n * score)
        self.sn.labels(version).inc(n)

    def scrape(self) -> Scrape:
        return parse_metrics(generate_latest(self.reg).decode())


def test_parse_reads_the_ranker_families() -> None:
    r = Ranker()
    r.serve("v1", 10, errors=2, latency=0.02, score=0.5)
    r.req.labels("v1", "429").inc(3)
    r.mm.inc(1)
    s = r.scrape()
    assert s.requests == {("v1", "200"): 8, ("v1", "503"): 2, ("v1", "429"): 3}
    assert s.mismatch == 1
    assert s.scores == {"v1": 10} and s.score_sum["v1"] == pytest.approx(5.0)
    assert s.buckets[("v1", float("inf"))] == 10
    assert Scrape.from_json(s.to_json()) == s


def test_histogram_quantile_matches_prometheus_interpolation() -> None:
    b = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, b) == pytest.approx(0.1)
    assert histogram_quantile(0.7, b) == pytest.approx(0.15)
    assert histogram_quantile(0.99, b) == pytest.approx(0.2 + 0.3 * 9 / 10)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 10.0}) == 0.1
    assert histogram_quantile(0.99, {}) is None
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None


def test_window_is_the_increase_and_survives_a_reset() -> None:
    a, b = Ranker(), Ranker()
    a.serve("v1", 100)
    before = [a.scrape(), b.scrape()]
    a.serve("v1", 30)
    b.serve("v1", 5)
    w = window(before, [a.scrape(), b.scrape()])
    assert w.requests[("v1", "200")] == 35
    restarted = Ranker()  # counters back at zero: they count from there
    restarted.serve("v1", 7)
    w = window([a.scrape()], [restarted.scrape()])
    assert w.requests[("v1", "200")] == 7


CFG = GateConfig(max_error_rate=0.05, max_p99_ratio=1.5, p99_slack_s=0.01, max_score_drift=0.05,
                 min_requests=20)


def _judge(**new: float) -> tuple[list[str], dict[str, object]]:
    r = Ranker()
    r.serve("v1", 500, latency=0.02, score=0.1)
    before = [r.scrape()]
    r.serve("v1", 100, latency=0.02, score=0.1)
    r.serve("v2", int(new.get("n", 100)), errors=int(new.get("errors", 0)),
            latency=new.get("latency", 0.02), score=new.get("score", 0.1))
    if new.get("mismatch"):
        r.mm.inc(new["mismatch"])
    res = evaluate(before, [r.scrape()], "v1", "v2", CFG)
    return [f.code for f in res.failures], res.detail


def test_healthy_canary_passes() -> None:
    codes, detail = _judge()
    assert codes == [] and detail["conclusive"]


@pytest.mark.parametrize(("new", "code"), [
    ({"errors": 10}, "error_rate"),
    ({"latency": 0.2}, "latency"),
    ({"score": 0.3}, "score_drift"),
    ({"mismatch": 1}, "mismatch"),
])
def test_each_check_fails_on_its_own(new: dict[str, float], code: str) -> None:
    codes, _ = _judge(**new)
    assert codes == [code]


def test_429_is_not_an_error() -> None:
    r = Ranker()
    before = [r.scrape()]
    r.serve("v2", 100)
    r.req.labels("v2", "429").inc(50)
    assert evaluate(before, [r.scrape()], "v1", "v2", CFG).ok


def test_too_few_requests_is_inconclusive_but_mismatch_still_counts() -> None:
    codes, detail = _judge(n=10, errors=10, latency=1.0)
    assert codes == [] and not detail["conclusive"]
    codes, _ = _judge(n=0, mismatch=2)
    assert codes == ["mismatch"]


def test_old_version_without_traffic_falls_back_to_lifetime_figures() -> None:
    r = Ranker()
    r.serve("v1", 500, latency=0.02, score=0.1)
    before = [r.scrape()]
    r.serve("v2", 100, latency=0.3, score=0.1)  # 100% on v2: v1 idle in the window
    res = evaluate(before, [r.scrape()], "v1", "v2", CFG)
    assert [f.code for f in res.failures] == ["latency"]
    assert res.detail["old"]["requests"] == 500


def _result(ok: bool, fatal: bool = False) -> GateResult:
    return GateResult(() if ok else (GateFailure("error_rate", "bad", fatal=fatal),), {})


def test_tracker_tolerates_one_blip() -> None:
    t = GateTracker(fail_after=2, max_failures=3)
    assert t.record(_result(False)) == Verdict.CONTINUE
    assert t.record(_result(True)) == Verdict.PASS


def test_tracker_fails_on_consecutive_failures() -> None:
    t = GateTracker(fail_after=2, max_failures=3)
    t.record(_result(False))
    assert t.record(_result(False)) == Verdict.FAIL
    assert t.reason()[0] == "gate_error_rate"


def test_tracker_fails_a_flapping_gate() -> None:
    t = GateTracker(fail_after=2, max_failures=3)
    verdicts = [t.record(_result(ok)) for ok in (False, True, False, True, False)]
    assert verdicts == [Verdict.CONTINUE, Verdict.PASS, Verdict.CONTINUE, Verdict.PASS,
                        Verdict.FAIL]
    code, msg = t.reason()
    assert code == "gate_flapping" and "3 of 5" in msg


def test_tracker_fatal_fails_at_once() -> None:
    t = GateTracker(fail_after=5, max_failures=5)
    assert t.record(_result(False, fatal=True)) == Verdict.FAIL


@pytest.mark.parametrize("bad", [
    GateConfig(max_error_rate=2), GateConfig(max_p99_ratio=0.5), GateConfig(min_requests=0),
    GateConfig(max_score_drift=-1)])
def test_gate_config_validation(bad: GateConfig) -> None:
    with pytest.raises(ValueError):
        bad.validate()

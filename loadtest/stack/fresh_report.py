"""After the freshness scenario: its answers checked offline, AUC over time, lags, JSON, summary.

`analyse` turns what the run saw (answers, the rankers' polled seqs, phase times, the deltas
on disk) into the result dict (written as JSON), and `summary` into the lines printed at
the end. Offline work (fresh_truth) dominates: every answer is re-scored at the
(version, seq) it names, and static v1 scores every eval request once for the paired AUC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.locust.served import auc
from loadtest.stack import fresh_timeline as tl
from loadtest.stack import fresh_truth as truth

SCORE_TOL = 2e-3
"""A served score may differ from the offline one by this much (the ranker's integration
tests' tolerance vs modelpack.scorer; the CPU path agrees to ~1e-6)."""


@dataclass
class RunFacts:
    """What the scenario saw, for `analyse`."""

    model_dir: Path
    """The store copy's STORE/MODEL: v1 (with the deltas written during the run) and v2."""
    t0: float
    phases: list[tl.Phase]
    answers: list[tl.Answer]
    polled: dict[int, list[tuple[float, int]]]
    """Per ranker, (time, seq) of v1 from the admin polls."""
    rankers: int
    mismatch_metric: float
    """Growth of ranker_version_mismatch_total over every ranker during the run."""
    rollout: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def written_times(vdir: Path) -> dict[int, float]:
    """Every delta's written_at, by seq."""
    from modelpack.delta_read import list_seqs, load_delta_manifest
    from modelpack.manifest import read_manifest

    base = read_manifest(vdir)
    return {s: load_delta_manifest(vdir, s, base).written_at for s in list_seqs(vdir)}


def _r(v: float | None, nd: int = 5) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), nd)


def per_seq_auc(answers: Sequence[tl.Answer], labels: Sequence[np.ndarray], version: str
                ) -> dict[int, dict[str, Any]]:
    """Served AUC of `version`'s answers grouped by the seq they name (small groups: noisy)."""
    out: dict[int, dict[str, Any]] = {}
    for s in sorted({a.seq for a in answers if a.ok and a.version == version}):
        rows = [a for a in answers if a.ok and a.version == version and a.seq == s]
        y = np.concatenate([labels[a.index] for a in rows])
        out[s] = {"requests": len(rows),
                  "served_auc": _r(auc(y, np.concatenate([a.scores for a in rows
                                                          if a.scores is not None])))}
    return out


@dataclass
class PlotData:
    """What fresh_plot draws beside the answers."""

    windows: list[tl.Window]
    written: dict[int, float]
    lags: dict[int, float | None]
    anchors: dict[str, float]


def analyse(f: RunFacts, data: truth.EvalData, window_s: float
            ) -> tuple[dict[str, Any], PlotData]:
    """The result dict (JSON-ready) and what the plot needs."""
    v1, v2 = f.model_dir / "v1", f.model_dir / "v2"
    written = written_times(v1)
    last = max(written, default=0)
    offline = truth.for_answers(f.model_dir, f.answers, data, ["v1", "v2"])
    check = tl.check_answers(f.answers, offline, SCORE_TOL)
    baseline = truth.all_scores(v1, 0, data)
    y_all = np.concatenate(data.labels)
    anchors = {"static v1": auc(y_all, np.concatenate(baseline)),
               f"v1 + deltas 1..{last}": truth.auc_at(v1, last, data),
               "v2": truth.auc_at(v2, 0, data)}
    wins = tl.windows(f.answers, data.labels, baseline, window_s, f.t0)
    lags_poll = tl.freshness_lags(written, f.polled)
    lags_answers = tl.freshness_lags(written, tl.first_serving(f.answers, "v1", f.rankers))
    failed = [a for a in f.answers if not a.ok]
    res = {
        "scenario": "fresh", "config": f.config, "rankers": f.rankers,
        "eval_requests": len(data.requests),
        "phases": [{"name": p.name, "start_s": round(p.start - f.t0, 2),
                    "end_s": round(p.end - f.t0, 2)} for p in f.phases],
        "requests": len(f.answers), "failed": len(failed),
        "failures": [f"{a.t_sent - f.t0:.1f}s ranker {a.ranker}: {a.error}" for a in failed[:10]],
        "mismatched": len(check.mismatched) + int(f.mismatch_metric),
        "mismatch": {"answers_vs_offline": len(check.mismatched),
                     "ranker_version_mismatch_total": f.mismatch_metric,
                     "examples": check.mismatched[:10], "checked": check.checked,
                     "tolerance": SCORE_TOL, "at_seq_ge_1": check.at_positive_seq,
                     "told_apart_from_seq_minus_1": check.resolved},
        "deltas": {"written": len(written), "last_seq": last,
                   "written_at_s": {s: round(t - f.t0, 3) for s, t in written.items()}},
        "freshness": {"from_admin_polls": tl.lag_summary(lags_poll),
                      "from_answers": tl.lag_summary(lags_answers),
                      "lags_s": {s: _r(v, 3) for s, v in lags_poll.items()},
                      "lags_from_answers_s": {s: _r(v, 3) for s, v in lags_answers.items()}},
        "auc": {"offline_whole_eval_set": {k: _r(v) for k, v in anchors.items()},
                "phases": {k: {kk: _r(vv, 5 if "auc" in kk else 1) for kk, vv in v.items()}
                           for k, v in tl.phase_auc(f.answers, data.labels, baseline,
                                                    f.phases).items()},
                "per_seq_v1": per_seq_auc(f.answers, data.labels, "v1"),
                "window_s": window_s,
                "windows": [{"start_s": round(w.start - f.t0, 2), "requests": w.requests,
                             "served_auc": _r(w.served_auc), "static_v1_auc": _r(w.baseline_auc),
                             "seqs": list(w.seqs), "versions": list(w.versions)} for w in wins]},
        "rollout": f.rollout,
    }
    return res, PlotData(wins, written, lags_poll, anchors)


def verdict(res: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Whether the run is OK, and why not."""
    why = []
    if res["requests"] == 0:
        why.append("no requests answered")
    if res["failed"]:
        why.append(f"{res['failed']} failed requests")
    if res["mismatched"]:
        why.append(f"{res['mismatched']} mismatched answers")
    if res["deltas"]["written"] == 0:
        why.append("no delta was written")
    elif res["freshness"]["from_admin_polls"]["never_served"]:
        why.append(f"{res['freshness']['from_admin_polls']['never_served']} deltas never "
                   "served by every ranker")
    if res["rollout"].get("status") != "succeeded":
        why.append(f"the rollout to v2 did not succeed ({res['rollout'].get('status')})")
    return not why, why


def summary(res: Mapping[str, Any], png: Path, json_path: Path, run_s: float) -> list[str]:
    off = res["auc"]["offline_whole_eval_set"]
    ph = res["auc"]["phases"]
    fr = res["freshness"]["from_admin_polls"]
    mm = res["mismatch"]
    lines = ["", "=" * 78, "FRESHNESS SCENARIO: day-1 traffic, static v1 -> v1 + deltas -> v2",
             "=" * 78,
             f"requests {res['requests']}, failed {res['failed']}, mismatched {res['mismatched']}"
             f" ({mm['answers_vs_offline']} answers whose scores are not their (version, seq)'s "
             f"of {mm['checked']} checked; ranker_version_mismatch_total +"
             f"{mm['ranker_version_mismatch_total']:.0f})",
             f"deltas written {res['deltas']['written']}; freshness lag (written -> every ranker "
             f"serving it) p50 {fr['p50_s']} s, p99 {fr['p99_s']} s, max {fr['max_s']} s",
             "", f"  {'phase':<18}{'requests':>9}{'failed':>7}{'p50 ms':>8}{'p99 ms':>8}"
                 f"{'served AUC':>12}{'static v1 AUC':>15}"]
    for name, p in ph.items():
        lines.append(f"  {name:<18}{int(p['requests'] or 0):>9}{int(p['failed'] or 0):>7}"
                     f"{p['p50_ms'] or math.nan:>8.1f}{p['p99_ms'] or math.nan:>8.1f}"
                     f"{_fmt(p['served_auc']):>12}{_fmt(p['baseline_auc']):>15}")
    lines += ["  (static v1 AUC: the same requests scored offline by static v1: the paired "
              "reference)", "",
              f"offline AUC on the whole eval set ({res['eval_requests']:,} day-1 requests): "
              + "; ".join(f"{k} {_fmt(v)}" for k, v in off.items()),
              f"rollout to v2: {res['rollout'].get('status')}",
              f"result {json_path}; plot {png}; run {run_s:.0f} s"]
    ok, why = verdict(res)
    lines.append("RESULT: " + ("OK: 0 failed, 0 mismatched; every delta served by every ranker"
                               if ok else "NOT OK: " + "; ".join(why)))
    return lines


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"

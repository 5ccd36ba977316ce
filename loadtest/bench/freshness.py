"""Issue 12's freshness benchmarks, from one run of the freshness scenario through the real stack.

    python -m loadtest.bench.freshness [--out build/bench-fresh] [--every 80000] [--curve-step 1]

1. runs loadtest/stack/fresh.py (2 shards x 2 replicas, 2 rankers, the controller
   following v1's delta directory while delta-train writes a delta every --every examples
   of the day-1 log, then a rollout to v2), which checks every answer against the
   (version, seq) it names;
2. **freshness lag** (fresh_lag.json/.png): per delta, from its written_at until every
   ranker serves it (each ranker's admin GET polled every 0.1 s; the answers' seq as a
   second view), p50/p99 against the 2 s target;
3. **served AUC on day-1 traffic** (fresh_auc.json/.png): the offline truth per seq, AUC
   of (v1's dense, v1's rows + deltas 1..s) on the whole eval set for s = 0..last (every
   --curve-step), beside v2's; and the served AUC per phase from the answers' own scores,
   with the same requests' static-v1 AUC as the paired reference.

Results go to loadtest/results/ (bench/record.py) unless --results says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from loadtest.bench.plotting import Panel
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.harness.procfs import loadavg
from loadtest.stack import fresh
from loadtest.stack.demo import MODEL
from loadtest.stack.fresh_truth import EvalData, auc_at

log = logging.getLogger("loadtest.bench.freshness")
LAG_TARGET_S = 2.0


def offline_curve(model_dir: Path, last: int, step: int, data: EvalData) -> dict[int, float]:
    """AUC of v1 + deltas 1..s on the whole eval set, s = 0, step, 2 step, ..., last."""
    seqs = sorted({*range(0, last + 1, max(1, step)), last})
    out = {}
    for s in seqs:
        out[s] = round(auc_at(model_dir / "v1", s, data), 5)
        log.info("offline AUC at v1 seq %d: %.5f", s, out[s])
    return out


def lag_record(res: dict[str, Any], config: dict[str, Any]) -> BenchRecord:
    fr = res["freshness"]
    polls, answers = fr["from_admin_polls"], fr["from_answers"]
    rec = BenchRecord(
        "issue 12 freshness lag", compared="delta written (its written_at) -> every ranker "
        "serving it, through the real stack: 2 shards x 2 replicas, 2 rankers, the controller "
        "following the delta directory", anchor=f"target <= {LAG_TARGET_S:g} s", device="cpu",
        config=config)
    rec.verdict = {"deltas": polls["deltas"], "never_served": polls["never_served"],
                   "p50_s": polls["p50_s"], "p99_s": polls["p99_s"], "max_s": polls["max_s"],
                   "target_s": LAG_TARGET_S,
                   "met": polls["p99_s"] is not None and polls["p99_s"] <= LAG_TARGET_S,
                   "from_answers_p50_s": answers["p50_s"], "from_answers_p99_s": answers["p99_s"],
                   "failed": res["failed"], "mismatched": res["mismatched"]}
    rec.results = {"lags_s": fr["lags_s"], "lags_from_answers_s": fr["lags_from_answers_s"],
                   "deltas_written_at_s": res["deltas"]["written_at_s"],
                   "requests": res["requests"], "mismatch": res["mismatch"]}
    return rec


def auc_record(res: dict[str, Any], curve: dict[int, float], config: dict[str, Any]
               ) -> BenchRecord:
    off = res["auc"]["offline_whole_eval_set"]
    static, v2 = off["static v1"], off["v2"]
    last = max(curve)
    ph = res["auc"]["phases"]
    rec = BenchRecord(
        "issue 12 served AUC on day-1 traffic", compared="v1 + deltas (v1's tables trained on "
        "the day-1 log, dense frozen) vs static v1 vs v2, offline per seq and served",
        anchor="static v1 (offline, the same eval set)", device="cpu", config=config)
    rec.verdict = {"static_v1_auc": static, "v1_plus_deltas_auc": curve[last], "deltas": last,
                   "v2_auc": v2, "gain_vs_static": round(curve[last] - static, 5),
                   "gap_to_v2": round(v2 - curve[last], 5),
                   "share_of_v2_gain": round((curve[last] - static) / (v2 - static), 3)
                   if v2 != static else None,
                   "served_last_phase_auc": ph.get("v1 + all deltas", {}).get("served_auc"),
                   "served_last_phase_static_v1_auc":
                       ph.get("v1 + all deltas", {}).get("baseline_auc"),
                   "failed": res["failed"], "mismatched": res["mismatched"]}
    rec.results = {"offline_auc_per_seq": curve, "served_phases": ph,
                   "served_per_seq_v1": res["auc"]["per_seq_v1"],
                   "windows": res["auc"]["windows"], "eval_requests": res["eval_requests"]}
    return rec


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--curve-step", type=int, default=1, help="offline AUC every N seqs")
    own.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and PNG go")
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.freshness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[own])
    fresh.add_arguments(p)
    p.set_defaults(out=Path("build/bench-fresh"), every=80_000)
    args = p.parse_args(argv)
    scenario = own.parse_known_args(argv)[1]  # everything else is the scenario's
    load_before = loadavg()  # the records are made after the scenario: its start's load here
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per admin poll otherwise
    code = fresh.main([*scenario, "--out", str(args.out), "--every", str(args.every)])
    res_path = args.out / "fresh.json"
    if not res_path.is_file():
        print(f"error: the scenario wrote no {res_path} (exit {code})", file=sys.stderr)
        return 1
    res = json.loads(res_path.read_text())
    config = {**res["config"], "curve_step": args.curve_step, "scenario_exit": code,
              "loadavg_before_scenario": load_before,
              "scenario_run_s": res.get("run_s")}
    data = EvalData.load(args.out / "store" / MODEL / "v2" / "eval.jsonl", args.eval_limit)
    curve = offline_curve(args.out / "store" / MODEL, res["deltas"]["last_seq"],
                          args.curve_step, data)
    lag = lag_record(res, config)
    seqs = sorted(res["freshness"]["lags_s"], key=int)
    lag.write(args.results / "fresh_lag.json", [
        Panel("lag per delta: written -> every ranker serving it", seqs,
              {"admin polls (0.1 s)": [res["freshness"]["lags_s"][s] for s in seqs],
               "answers' seq": [res["freshness"]["lags_from_answers_s"][s] for s in seqs]},
              ylabel="s", targets={f"target {LAG_TARGET_S:g} s": LAG_TARGET_S}, annotate=False),
        Panel("lag percentiles", ["p50", "p99"],
              {"admin polls": [lag.verdict["p50_s"], lag.verdict["p99_s"]],
               "answers' seq": [lag.verdict["from_answers_p50_s"],
                                lag.verdict["from_answers_p99_s"]]},
              ylabel="s", targets={f"target {LAG_TARGET_S:g} s": LAG_TARGET_S})],
        title=f"Freshness lag over {len(seqs)} deltas (2 shards x 2 replicas, 2 rankers)")
    rec = auc_record(res, curve, config)
    off = res["auc"]["offline_whole_eval_set"]
    ph = res["auc"]["phases"]
    static = off["static v1"]
    rec.write(args.results / "fresh_auc.json", [
        Panel("offline AUC - static v1's, whole day-1 eval set, per delta seq",
              [str(s) for s in curve], {"v1 + deltas 1..s": [a - static for a in curve.values()]},
              ylabel="AUC gain", annotate=False,
              targets={f"v2 ({off['v2']:.4f} vs static v1 {static:.4f})": off["v2"] - static}),
        Panel("served AUC per phase - the same requests' static v1 AUC", list(ph),
              {"served - static v1": [None if v["served_auc"] is None else
                                      v["served_auc"] - v["baseline_auc"] for v in ph.values()]},
              ylabel="AUC gain")],
        title="Served AUC on day-1 traffic: v1 + deltas vs static v1 vs v2")
    print(json.dumps({"lag": lag.verdict, "auc": rec.verdict}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())

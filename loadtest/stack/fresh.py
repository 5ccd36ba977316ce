"""The freshness scenario: day-1 traffic served by static v1, by v1 + deltas as they are trained,
then by v2; served AUC over time, seq over time, freshness lag, a JSON result and a PNG.

    python -m loadtest.stack.demo --scenario fresh [--out build/fresh] [--rate 30]
    python -m loadtest.stack.fresh ...            (the same)

1. builds the demo store if missing, then copies v1 and v2 (without any deltas) to
   OUT/store: the deltas of this run are written there, never into --store, so the plain
   demo's v1 stays v1 (OUT/store is replaced by the next run);
2. starts 2 embedding shards x 2 replicas, 2 rankers and the deploy controller on loopback,
   the controller following the serving version's delta directory (--delta-poll-s);
3. sends v2's eval requests (day-1 traffic, labels kept aside) to both rankers at --rate
   requests/s, protobuf, keeping every answer's (version, seq) and scores;
4. phases: static v1 for --static-s; then `python -m modelpack delta-train OUT/store/ads_ctr/v1`
   (v1's tables trained further on the day-1 log with v1's dense frozen, a delta every
   --every examples) while the controller applies each delta to every replica and moves
   every ranker to it; --hold-s once the last delta is committed; then
   `deployctl rollout ads_ctr v2` (a normal rollout: v2 starts at its own seq 0); --tail-s of v2;
5. stops everything, re-scores every answer offline at the (version, seq) it names
   (a mismatch: scores that are not that read's), and writes OUT/fresh.json, OUT/fresh.png
   and OUT/summary.txt.

Exit code 0 with 0 failed and 0 mismatched requests, every delta served by every ranker,
and the rollout to v2 succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.harness.probes import metric_sum
from loadtest.stack import fresh_plot
from loadtest.stack import fresh_timeline as tl
from loadtest.stack.demo import DEMO_GATES, MODEL, Clock, Signals, guarded, rollout
from loadtest.stack.fresh_load import Load, SeqPoller
from loadtest.stack.fresh_report import RunFacts, analyse, summary, verdict, written_times
from loadtest.stack.fresh_truth import EvalData
from loadtest.stack.local import LocalStack, StackConfig, StackError, ensure_store

log = logging.getLogger("loadtest.stack.fresh")
VERSIONS = ("v1", "v2")


def copy_store(src: Path, dst: Path, model: str = MODEL) -> Path:
    """dst/<model>/{v1,v2}: the versions' files without their deltas (dst is replaced)."""
    if dst.exists():
        shutil.rmtree(dst)
    for v in VERSIONS:
        shutil.copytree(src / model / v, dst / model / v, ignore=shutil.ignore_patterns("deltas"))
    return dst


@dataclass
class Marks:
    """time.time() at each phase boundary."""

    load: float = 0.0
    train: float = 0.0
    all_served: float = 0.0
    rollout: float = 0.0
    rolled: float = 0.0
    end: float = 0.0

    def phases(self) -> list[tl.Phase]:
        cuts = [("static v1", self.load, self.train),
                ("deltas arriving", self.train, self.all_served),
                ("v1 + all deltas", self.all_served, self.rollout),
                ("rollout to v2", self.rollout, self.rolled), ("v2", self.rolled, self.end)]
        return [tl.Phase(n, a, b) for n, a, b in cuts if b > a > 0]


def controller_stream(stack: LocalStack) -> dict[str, Any]:
    r = httpx.get(f"{stack.controller_url}/v1/deltas/{MODEL}", timeout=5,
                  headers={"authorization": f"Bearer {stack.token}"})
    r.raise_for_status()
    out: dict[str, Any] = r.json()
    return out


def train_deltas(stack: LocalStack, v1: Path, args: argparse.Namespace, out: Path,
                 poller: SeqPoller, clock: Clock) -> subprocess.Popen[bytes]:
    """Run delta-train into the copy's v1 while the controller follows; returns once it exited."""
    argv = [sys.executable, "-m", "modelpack", "delta-train", str(v1), "--examples",
            str(args.examples), "--every", str(args.every)]
    clock.say("$ " + " ".join(["python", *argv[1:]]))
    with open(out / "delta-train.log", "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        shown = -1
        while proc.poll() is None:
            time.sleep(1.0)
            seqs = [obs[-1][1] if obs else 0 for obs in poller.serving("v1").values()]
            written = len([p for p in (v1 / "deltas").glob("*") if p.name.isdigit()]) \
                if (v1 / "deltas").is_dir() else 0
            if written != shown:
                clock.say(f"deltas written {written}; rankers serve v1 at seqs {seqs}")
                shown = written
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    if proc.returncode != 0:
        raise StackError(f"delta-train exited {proc.returncode}; see {out / 'delta-train.log'}")
    return proc


def wait_committed(stack: LocalStack, last: int, timeout_s: float, clock: Clock) -> None:
    """Until the controller has committed `last` (every replica applied it, every ranker on it)."""
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = controller_stream(stack)
        if int(st.get("committed_seq", 0)) >= last:
            clock.say(f"controller committed v1 seq {st['committed_seq']}")
            return
        time.sleep(0.2)
    raise StackError(f"the controller did not commit seq {last} in {timeout_s:.0f} s: "
                     f"state {st.get('state')}, committed {st.get('committed_seq')}, "
                     f"error {st.get('follow_error')}")


def mismatch_total(stack: LocalStack) -> float:
    return sum(metric_sum(r, "ranker_version_mismatch_total") for r in stack.rankers)


def run(args: argparse.Namespace, signals: Signals) -> int:
    clock = Clock()
    started = time.monotonic()
    out: Path = args.out
    ensure_store(args.store, MODEL, clock.say)
    out.mkdir(parents=True, exist_ok=True)
    store = copy_store(args.store, out / "store")
    model_dir = store / MODEL
    clock.say(f"copied {args.store}/{MODEL}/v1,v2 to {store} (this run's deltas go there)")
    data = EvalData.load(model_dir / "v2" / "eval.jsonl", args.eval_limit)
    for old in (out / "stack").glob("journal.sqlite*"):
        old.unlink()
    stack = LocalStack(StackConfig(
        store=store, run_dir=out / "stack", replicas=(2, 2), rankers=2,
        controller_extra=(*DEMO_GATES, "--delta-poll-s", f"{args.delta_poll_s:g}",
                          *args.controller_arg),
        ranker_extra=("--default-timeout-ms", f"{args.deadline_ms}", *args.ranker_arg)))
    marks = Marks()
    load: Load | None = None
    poller: SeqPoller | None = None
    answers: list[tl.Answer] = []
    code: int | None = None
    grown = 0.0
    try:
        clock.say("starting 2 embedding shards x 2 replicas, 2 rankers and the deploy controller")
        stack.start()
        clock.say(f"up: rankers {stack.ranker_urls}, controller {stack.controller_url}")
        with httpx.Client(timeout=10) as c:  # the first calls of each process, not measured
            for url in stack.ranker_urls:
                for body in data.bodies[:20]:
                    c.post(f"{url}/v1/rank", content=body,
                           headers={"content-type": "application/x-protobuf"})
        before = mismatch_total(stack)
        poller = SeqPoller(stack.ranker_urls, stack.token).start()
        marks.load = time.time()
        load = Load(stack.ranker_urls, data.bodies, data.sizes, args.rate).start()
        clock.say(f"load: {args.rate:g} requests/s over both rankers; static v1 for "
                  f"{args.static_s:g} s")
        time.sleep(args.static_s)
        marks.train = time.time()
        train_deltas(stack, model_dir / "v1", args, out, poller, clock)
        last = max((int(p.name) for p in (model_dir / "v1" / "deltas").iterdir()
                    if p.name.isdigit()), default=0)
        wait_committed(stack, last, args.commit_timeout_s, clock)
        marks.all_served = time.time()
        time.sleep(args.hold_s)
        marks.rollout = time.time()
        code = rollout(stack, args)
        marks.rolled = time.time()
        clock.say(f"deployctl exited {code}; v2 for {args.tail_s:g} s")
        time.sleep(args.tail_s)
        marks.end = time.time()
        answers = load.stop()
        load = None
        grown = mismatch_total(stack) - before
    finally:
        signals.stopping = True
        if load is not None:
            answers = load.stop(drain_s=0)
            marks.end = marks.end or time.time()
        if poller is not None:
            poller.stop()
        clock.say("stopping the stack")
        log.info("exit codes %s", stack.stop())
    from deploy_controller.journal import read_rollouts

    rollouts = read_rollouts(stack.journal) if stack.journal.exists() else []
    ro = rollouts[-1] if rollouts else None
    clock.say(f"{len(answers)} answers; checking each against its (version, seq) offline")
    first = written_times(model_dir / "v1").get(1)
    if first is not None and marks.train < first < marks.all_served:
        marks.train = first  # static v1 served until the first delta existed (trainer start-up)
    facts = RunFacts(model_dir, marks.load, marks.phases(), answers,
                     poller.serving("v1") if poller is not None else {},
                     len(stack.rankers), grown,
                     {"status": ro.status if ro else None, "deployctl_exit": code,
                      "seconds": round(ro.end - ro.start, 1) if ro else None},
                     {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    res, pd = analyse(facts, data, args.window_s)
    run_s = time.monotonic() - started
    res["run_s"] = round(run_s, 1)
    json_path, png = out / "fresh.json", out / "fresh.png"
    json_path.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    fresh_plot.plot(png, f"Freshness: day-1 traffic, static v1 -> v1 + {pd.written and max(pd.written)} "
                    f"deltas -> v2 (2 shards x 2 replicas, 2 rankers, {args.rate:g} req/s)",
                    marks.load, facts.phases, pd.windows, answers, facts.rankers, "v1",
                    pd.written, pd.lags, pd.anchors)
    text = summary(res, png, json_path, run_s)
    print("\n".join(text))
    (out / "summary.txt").write_text("\n".join(text).lstrip("\n") + "\n")
    return 0 if verdict(res)[0] else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=Path("demo_store"),
                   help="model store to copy v1 and v2 from (never written)")
    p.add_argument("--out", type=Path, default=Path("build/fresh"),
                   help="run directory: store copy, logs, fresh.json, fresh.png, summary.txt")
    p.add_argument("--rate", type=float, default=30.0, help="requests/s over both rankers")
    p.add_argument("--static-s", type=float, default=10.0,
                   help="seconds of static v1 before delta-train starts (its own start-up, "
                        "~15 s, adds to it)")
    p.add_argument("--examples", type=int, default=2_000_000,
                   help="delta-train examples (default: the demo's whole day 1, 2M)")
    p.add_argument("--every", type=int, default=100_000, help="examples per delta")
    p.add_argument("--delta-poll-s", type=float, default=0.25,
                   help="controller's look at the delta directory (its --delta-poll-s)")
    p.add_argument("--commit-timeout-s", type=float, default=90.0,
                   help="longest wait for the controller to commit the last delta")
    p.add_argument("--hold-s", type=float, default=15.0,
                   help="seconds of v1 + every delta before the rollout")
    p.add_argument("--canary", default="50,100", help="rollout canary shares")
    p.add_argument("--bake", type=float, default=5.0, help="seconds per canary step")
    p.add_argument("--tail-s", type=float, default=15.0, help="seconds of v2 at the end")
    p.add_argument("--window-s", type=float, default=10.0, help="AUC window (seconds)")
    p.add_argument("--eval-limit", type=int, default=0, help="use the first N eval requests")
    p.add_argument("--deadline-ms", type=int, default=5000,
                   help="the rankers' --default-timeout-ms (the requests carry none). 5 s, not "
                        "the ranker's 1 s: on a shared 2-core machine a neighbour's CPU burst "
                        "is not what this scenario measures")
    p.add_argument("--ranker-arg", action="append", default=[], help="extra ranker flag")
    p.add_argument("--controller-arg", action="append", default=[],
                   help="extra controller flag")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.stack.fresh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return guarded(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

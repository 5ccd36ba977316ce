"""The whole system in one command: a v1 -> v2 rollout under live load, then a summary and a PNG.

    python -m loadtest.stack.demo [--store demo_store] [--out build/demo] [--duration 60]
    python -m loadtest.stack.demo --scenario blue-green  (replicas hold one version each)
    python -m loadtest.stack.demo --scenario fresh [...]   (delta freshness: loadtest/stack/fresh.py)

1. builds the demo model store if it is missing (reuses it when every checksum verifies);
2. starts 2 embedding shards, a ranker and the deploy controller on loopback
   (loadtest/stack/local.py: free ports, admin token in a private temp dir);
3. runs Locust headless (loadtest/locust/locustfile.py, a subprocess) for `--duration` seconds
   with requests from v2's eval set (day-1 traffic, labels kept aside);
4. `--rollout-at` seconds in, runs `deployctl rollout ads_ctr v2 --canary 10,50,100
   --bake N` and shows its live progress;
5. stops everything (SIGTERM, then SIGKILL; also on Ctrl-C and errors), prints the
   summary (requests, failures, p50/p99 before/during/after the rollout, version
   mismatches from the ranker's /metrics, served AUC per version from the answers'
   scores against the eval labels) and writes the PNG (loadtest/locust/report.py).

Exit code 0 when the rollout succeeded with no failed request and no mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from deploy_controller.journal import Rollout, read_rollouts
from loadtest.locust import report
from loadtest.locust.served import Request, percentile, read_request_log
from loadtest.stack import bluegreen
from loadtest.stack.local import LocalStack, StackConfig, StackError, ensure_store

log = logging.getLogger("loadtest.stack.demo")
MODEL = "ads_ctr"
SCENARIOS = ("rollout", "blue-green", "fresh")
REPO = Path(__file__).resolve().parents[2]
# Gates for a shared 2-core machine: latency noise from neighbours must not fail a healthy
# rollout, while errors and mismatches still do (their thresholds stay at the defaults).
DEMO_GATES = ("--gate-interval-s", "3", "--gate-min-requests", "15", "--gate-max-p99-ratio", "3",
              "--gate-p99-slack-s", "0.3", "--retry-backoff-s", "0.2")


class Interrupted(Exception):
    """SIGTERM/SIGINT: stop and clean up."""


class Signals:
    """The first SIGINT/SIGTERM interrupts the run; later ones must not interrupt the cleanup."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            print("already stopping: waiting for the processes to exit (SIGKILL after 20 s)",
                  file=sys.stderr, flush=True)
            return
        self.stopping = True
        raise Interrupted(signal.Signals(signum).name)


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


# ------------------------------------------------------------------ steps


def warm_up(stack: LocalStack, eval_path: Path, n: int = 40) -> None:
    """A few requests first, so the 'before' figures are not the processes' first calls."""
    with open(eval_path, encoding="utf-8") as f, httpx.Client(timeout=10) as c:
        for _, line in zip(range(n), f, strict=False):
            c.post(f"{stack.ranker_url}/v1/rank", content=line.encode(),
                   headers={"content-type": "application/json"})


def start_locust(stack: LocalStack, prefix: Path, eval_path: Path, args: argparse.Namespace
                 ) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = prefix.parent / "locust.log"
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locust" / "locustfile.py"),
            "--headless", "-u", str(args.users), "-r", str(args.users),
            "--run-time", f"{args.duration}s", "--host", stack.ranker_url,
            "--eval", str(eval_path), "--user-rps", str(args.user_rps),
            "--csv", str(prefix), "--csv-full-history", "--only-summary",
            "--max-requests", str(int(args.users * args.user_rps * args.duration * 2)),
            "--slo-max-failure-ratio", "0", "--slo-p99-ms", "0"]
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                stdin=subprocess.DEVNULL)
    return proc, log_path


def stop_locust(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def rollout(stack: LocalStack, args: argparse.Namespace) -> int:
    from deploy_controller import cli

    shown = f"deployctl rollout {MODEL} v2 --canary {args.canary} --bake {args.bake:g}"
    print(f"\n$ {shown}", flush=True)
    code = cli.main(["rollout", MODEL, "v2", "--canary", args.canary, "--bake", f"{args.bake:g}",
                     "--poll", "2", "--controller", stack.controller_url,
                     "--token-file", str(stack.token_file)])
    print(flush=True)
    if code == 130:
        raise Interrupted("SIGINT")
    return code


# ------------------------------------------------------------------ summary


@dataclass
class Window:
    name: str
    rows: list[Request]

    def line(self) -> str:
        lat = [r.latency_ms for r in self.rows if r.status == 200]
        fails = sum(r.status != 200 for r in self.rows)
        ok = [r.version for r in self.rows if r.status == 200]
        shares = " ".join(f"{v} {100 * ok.count(v) / len(ok):.0f}%" for v in sorted(set(ok)))
        return (f"  {self.name:<16}{len(self.rows):>9}{fails:>10}{percentile(lat, 50):>9.1f}"
                f"{percentile(lat, 99):>9.1f}   {shares}")


def windows(rows: Sequence[Request], r: Rollout | None) -> list[Window]:
    if r is None:
        return [Window("whole run", list(rows))]
    return [Window("before rollout", [x for x in rows if x.t < r.start]),
            Window("during rollout", [x for x in rows if r.start <= x.t <= r.end]),
            Window("after rollout", [x for x in rows if x.t > r.end]),
            Window("whole run", list(rows))]


def summary(rows: Sequence[Request], r: Rollout | None, served: dict[str, Any],
            mismatches: tuple[float, float], deployctl_code: int | None, locust_code: int | None,
            png: Path, eval_path: Path) -> tuple[str, bool]:
    lines = ["", "=" * 78, "SUMMARY", "=" * 78]
    if r is not None:
        lines.append(f"rollout {r.id}: {r.model} {r.from_version} -> {r.to_version}, canary "
                     f"{','.join(map(str, r.canary))}: {r.status} in {r.end - r.start:.1f} s"
                     + (f" ({r.reason})" if r.reason else ""))
    else:
        lines.append(f"no rollout ran (deployctl exit {deployctl_code})")
    lines += ["", f"  {'':<16}{'requests':>9}{'failures':>10}{'p50 ms':>9}{'p99 ms':>9}   "
                  "answered by"]
    lines += [w.line() for w in windows(rows, r)]
    failures = sum(x.status != 200 for x in rows)
    new_mismatches = mismatches[1] - mismatches[0]
    lines += ["", f"version mismatches (ranker_version_mismatch_total): {new_mismatches:.0f}"]
    aucs = []
    for v, s in served.get("versions", {}).items():
        a = s.get("served_auc")
        aucs.append(f"{v} {a:.4f} ({s['requests']} requests)" if a is not None else f"{v} n/a")
    lines.append(f"served AUC on {eval_path.parent.name}'s eval set (day-1 traffic), from the "
                 "answers' scores vs the labels:")
    lines.append("  " + ("; ".join(aucs) or "none"))
    offline = served.get("offline_int4_auc")
    if offline is not None:
        lines.append(f"  (offline INT4 AUC of {eval_path.parent.name} on the whole eval set: "
                     f"{offline:.4f})")
    lines.append(f"Locust exit code {locust_code}; report {png}")
    ok = (r is not None and r.status == "succeeded" and failures == 0 and new_mismatches == 0
          and len(rows) > 0)
    lines.append("RESULT: " + ("OK: rolled v1 -> v2 under load with 0 failed requests and "
                               "0 mismatches" if ok else "NOT OK (see above)"))
    return "\n".join(lines), ok


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace, signals: Signals) -> int:
    clock = Clock()
    store: Path = args.store
    out: Path = args.out
    ensure_store(store, MODEL, clock.say)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("locust*"), out / "report.png", out / "summary.txt",
                out / "replicas.png", out / "bluegreen.json"]:
        old.unlink(missing_ok=True)
    prefix = out / "locust"
    eval_path = store / MODEL / "v2" / "eval.jsonl"
    blue_green = args.scenario == "blue-green"
    gates, rankers = (*DEMO_GATES, *args.controller_arg), tuple(args.ranker_arg)
    stack = LocalStack(
        bluegreen.stack_config(store, out / "stack", controller_extra=gates, ranker_extra=rankers)
        if blue_green else StackConfig(store=store, run_dir=out / "stack",
                                       controller_extra=gates, ranker_extra=rankers))
    run_bg: bluegreen.BlueGreenRun | None = None
    for old in (out / "stack").glob("journal.sqlite*"):  # with its -wal and -shm
        old.unlink()
    locust: subprocess.Popen[bytes] | None = None
    deployctl_code: int | None = None
    locust_code: int | None = None
    mismatches = (math.nan, math.nan)
    try:
        clock.say("starting 2 embedding shards" + (
            " x 2 replicas (memory for one version each)" if blue_green else "")
            + ", the ranker and the deploy controller")
        stack.start()
        clock.say(f"up: ranker {stack.ranker_url}, controller {stack.controller_url}, "
                  f"shards {[p.address for reps in stack.shards for p in reps]}")
        warm_up(stack, eval_path)
        before = stack.metric("ranker_version_mismatch_total")
        locust, locust_log = start_locust(stack, prefix, eval_path, args)
        clock.say(f"Locust: {args.users} users x {args.user_rps:g} requests/s for "
                  f"{args.duration} s on {eval_path} (log {locust_log})")
        started = time.monotonic()
        time.sleep(args.rollout_at)
        if locust.poll() is not None:
            raise StackError(f"Locust exited early ({locust.returncode}); see {locust_log}")
        if blue_green:
            run_bg = bluegreen.run_blue_green(stack, "v2", canary=args.canary, bake_s=args.bake,
                                              strategy="auto")  # the controller says why
            deployctl_code = run_bg.exit_code
        else:
            deployctl_code = rollout(stack, args)
        clock.say(f"deployctl exited {deployctl_code}; load goes on until "
                  f"{args.duration} s")
        locust_code = stop_locust(locust, args.duration + 60 - (time.monotonic() - started))
        locust = None
        mismatches = (before, stack.metric("ranker_version_mismatch_total"))
    finally:
        signals.stopping = True
        if locust is not None:
            locust.send_signal(signal.SIGTERM)
            stop_locust(locust, 0)
        clock.say("stopping the stack")
        codes = stack.stop()
        log.info("exit codes %s", codes)
    rows = read_request_log(Path(f"{prefix}_requests.csv"))
    rollouts = read_rollouts(stack.journal) if stack.journal.exists() else []
    r = rollouts[-1] if rollouts else None
    served_path = Path(f"{prefix}_served.json")
    served = json.loads(served_path.read_text()) if served_path.is_file() else {}
    png = report.build(str(prefix), stack.journal if stack.journal.exists() else None,
                       out / "report.png",
                       title=f"make demo: {MODEL} v1 -> v2 under load "
                             f"(canary {args.canary}, bake {args.bake:g} s)")
    text, ok = summary(rows, r, served, mismatches, deployctl_code, locust_code, png, eval_path)
    if run_bg is not None:
        held = bluegreen.plot_replicas(run_bg, out / "replicas.png",
                                       title="which replica held which version (blue/green)")
        bluegreen.write_json(run_bg, out / "bluegreen.json")
        text += f"\nreplicas over time: {held} ({out / 'bluegreen.json'})\n"
    print(text)
    (out / "summary.txt").write_text(text.lstrip("\n") + "\n")
    clock.say(f"done; summary in {out / 'summary.txt'}, picture in {png}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--scenario", choices=SCENARIOS, default="rollout")
    chosen, rest = pick.parse_known_args(argv)
    if chosen.scenario == "fresh":
        from loadtest.stack import fresh

        return fresh.main(rest)
    p = argparse.ArgumentParser(prog="python -m loadtest.stack.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=SCENARIOS, default="rollout",
                   help="rollout: v1 -> v2 under load (default); blue-green: the same with "
                        "2 x 2 replicas that hold one version each, converted replica by "
                        "replica (plus replicas.png); fresh: v1 + deltas "
                        "(python -m loadtest.stack.demo --scenario fresh --help)")
    p.add_argument("--store", type=Path, default=Path("demo_store"), help="model store")
    p.add_argument("--out", type=Path, default=Path("build/demo"),
                   help="run directory: logs, Locust CSVs, journal, report.png, summary.txt")
    p.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    p.add_argument("--users", type=int, default=8, help="Locust users (default 8)")
    p.add_argument("--user-rps", type=float, default=10.0,
                   help="requests per second per user (default 10)")
    p.add_argument("--rollout-at", type=float, default=10.0,
                   help="seconds of load before the rollout starts (default 10)")
    p.add_argument("--canary", default="10,50,100", help="canary shares (default 10,50,100)")
    p.add_argument("--bake", type=float, default=9.0, help="seconds per canary step (default 9)")
    p.add_argument("--ranker-arg", action="append", default=[],
                   help="extra ranker flag (repeatable), e.g. --ranker-arg=--device=cpu")
    p.add_argument("--controller-arg", action="append", default=[],
                   help="extra controller flag (repeatable), e.g. --controller-arg=--gate-interval-s=1")
    return guarded(run, p.parse_args(argv))


def guarded(scenario: Callable[[argparse.Namespace, Signals], int], args: argparse.Namespace
            ) -> int:
    """Run a scenario: SIGINT/SIGTERM stop it cleanly (130), its errors end it in one line (1)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signals = Signals()
    previous = {s: signal.signal(s, signals) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return scenario(args, signals)
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\ninterrupted ({e}); everything was stopped", file=sys.stderr)
        return 130
    except (StackError, subprocess.CalledProcessError, OSError, httpx.HTTPError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())

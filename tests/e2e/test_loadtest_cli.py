"""The load tools as a person runs them: `make up`'s stack, the README's Locust commands
(real `locust` processes), the report, `make down`, and the whole `make demo` driver.

The commands are the README's, run through bash from the repository root with the
durations shortened and `demo_store`/`build/` pointed at this session's temp dirs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# What README.md shows (see the report of issue 6): keep the two in step.
README = {
    "curl": "head -1 demo_store/ads_ctr/v1/eval.jsonl | curl -s -H 'content-type: application/json'"
            " --data-binary @- \"$RANKER_URL/v1/rank\"",
    "locust": ".venv/bin/locust -f loadtest/locust/locustfile.py --headless -u 8 -r 8 --run-time 30s "
              "--host \"$RANKER_URL\" --eval demo_store/ads_ctr/v1/eval.jsonl "
              "--csv build/locust/run --csv-full-history",
    "steps": ".venv/bin/locust -f loadtest/locust/locustfile.py,loadtest/locust/shapes.py --headless "
             "--host \"$RANKER_URL\" --eval demo_store/ads_ctr/v1/eval.jsonl --body protobuf "
             "--step-users 4 --step-seconds 10 --steps 3",
    "grpc": ".venv/bin/locust -f loadtest/locust/grpc_user.py --headless -u 4 -r 4 --run-time 20s "
            "--host \"$SHARD0\" --store demo_store",
    "report": ".venv/bin/python -m loadtest.locust.report --csv build/locust/run "
              "--journal build/stack/journal.sqlite --out build/locust/report.png",
}


def _bash(cmd: str, env_file: Path, store: Path, build: Path, timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    cmd = (cmd.replace("demo_store", str(store)).replace("build/", f"{build}/")
           .replace(".venv/bin/", f"{BIN}/"))
    return subprocess.run(["bash", "-c", f". {env_file} && {cmd}"], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not reaped, has an empty command line)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except OSError:
        return False


def test_up_readme_commands_report_down(store: Path, tmp_path: Path) -> None:
    build = tmp_path / "build"
    run_dir = build / "stack"
    # `make up` / `make down` pass the run dir relative to where they run (build/stack).
    up = subprocess.run([sys.executable, "-m", "loadtest.stack", "up", "--store", str(store),
                         "--run-dir", "build/stack", "--free-ports"], cwd=tmp_path, text=True,
                        capture_output=True, timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((run_dir / "stack.json").read_text())
    pids = [p["pid"] for p in state["processes"]]
    env = run_dir / "env"
    try:
        assert "curl" in up.stdout and "build/stack/env" in up.stdout
        again = subprocess.run([sys.executable, "-m", "loadtest.stack", "up", "--store",
                                str(store), "--run-dir", "build/stack"], cwd=tmp_path, text=True,
                               capture_output=True, timeout=60)
        assert "already running" in again.stdout

        curl = _bash(README["curl"], env, store, build)
        answer = json.loads(curl.stdout)
        assert answer["version"] == "v1" and len(answer["scores"]) == 16, curl

        t0 = time.monotonic()
        loc = _bash(README["locust"].replace("30s", "4s"), env, store, build)
        assert loc.returncode == 0, loc.stderr[-3000:]
        assert "SLO met" in loc.stderr and "/v1/rank json v1" in loc.stdout + loc.stderr
        served = json.loads((build / "locust" / "run_served.json").read_text())
        assert served["failures"] == 0 and served["versions"]["v1"]["requests"] > 20
        assert served["versions"]["v1"]["served_auc"] is not None
        rows = (build / "locust" / "run_requests.csv").read_text().splitlines()
        assert rows[0] == "t,latency_ms,status,version,kind" and len(rows) > 20

        steps = _bash(README["steps"].replace("--step-seconds 10", "--step-seconds 1.5"), env,
                      store, build)
        assert steps.returncode == 0, steps.stderr[-3000:]
        assert "Shape test updating to 12 users" in steps.stderr
        assert "/v1/rank protobuf v1" in steps.stdout + steps.stderr

        grpc = _bash(README["grpc"].replace("20s", "3s"), env, store, build)
        assert grpc.returncode == 0, grpc.stderr[-3000:]
        lookups = re.search(r"grpc\s+Lookup\s+(\d+)\s+(\d+)\(", grpc.stdout + grpc.stderr)
        assert lookups and int(lookups[1]) > 50 and lookups[2] == "0", grpc.stderr[-2000:]

        rep = _bash(README["report"], env, store, build)
        assert rep.returncode == 0, rep.stderr
        assert (build / "locust" / "report.png").read_bytes()[:4] == b"\x89PNG"

        # Bounds and guards: no --run-time but --max-requests; an SLO breach exits 1;
        # a host that is not loopback is refused before a single request (exit 2).
        slo = _bash(".venv/bin/locust -f loadtest/locust/locustfile.py --headless -u 2 -r 2 "
                    "--host \"$RANKER_URL\" --eval demo_store/ads_ctr/v1/eval.jsonl "
                    "--max-requests 30 --slo-p99-ms 0.001", env, store, build)
        assert slo.returncode == 1 and "SLO breached: p99" in slo.stderr, slo.stderr[-2000:]
        assert "--max-requests 30 reached" in slo.stderr
        remote = _bash(".venv/bin/locust -f loadtest/locust/locustfile.py --headless -u 1 -r 1 "
                       "--run-time 5s --host http://10.0.0.1:8080", env, store, build, 30)
        assert remote.returncode == 2 and "not loopback" in remote.stderr
        print(f"\nREADME commands against `make up`'s stack: all as printed, "
              f"{time.monotonic() - t0:.0f} s")
    finally:
        down = subprocess.run([sys.executable, "-m", "loadtest.stack", "down", "--run-dir",
                               "build/stack"], cwd=tmp_path, text=True, capture_output=True,
                              timeout=60)
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("stopped ") == 4
    assert not any(_alive(p) for p in pids)
    assert not (run_dir / "stack.json").exists() and not Path(state["token_dir"]).exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{state['ranker_url']}/healthz", timeout=2)


def test_demo_rolls_out_under_load_and_writes_summary_and_png(store: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "demo"
    t0 = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "loadtest.stack.demo", "--store", str(store), "--out", str(out),
         "--duration", "24", "--rollout-at", "5", "--bake", "2", "--users", "4",
         "--ranker-arg=--device=cpu", "--controller-arg=--gate-max-score-drift=0.5"],
        cwd=REPO, text=True, capture_output=True, timeout=300)
    took = time.monotonic() - t0
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "RESULT: OK" in summary and "succeeded" in summary
    for window in ("before rollout", "during rollout", "after rollout"):
        assert window in summary
    assert re.search(r"after rollout\s+\d+\s+0\s", summary), summary
    assert "version mismatches (ranker_version_mismatch_total): 0" in summary
    assert re.search(r"v1 0\.\d+ \(\d+ requests\); v2 0\.\d+", summary), summary
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "$ deployctl rollout ads_ctr v2 --canary 10,50,100 --bake 2" in demo.stdout
    ranker = re.search(r"up: ranker (http://127\.0\.0\.1:\d+)", demo.stdout)
    assert ranker is not None
    with pytest.raises(httpx.HTTPError):  # everything was stopped
        httpx.get(f"{ranker[1]}/healthz", timeout=2)
    print(f"\ndemo (small store, 24 s of load): {took:.0f} s end to end\n{summary}")

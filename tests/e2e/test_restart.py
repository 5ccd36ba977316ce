"""Issue 11, finding 1: every kind of process restarted with its original command line
converges to what the fleet serves, after a rollout, mid-rollout and with the controller
down; no ranker claims ready while it cannot serve.

One stack: shard 0 with 2 replicas, shard 1 with 1, one ranker, all started on v1
(`--preload ads_ctr/v1`, `--version v1`) with the stack's `--desired-state` file
(loadtest/stack/commands.py). A restart reuses the process's command line and port.

- After a rollout to v2, controller down: a replica of shard 0 restarted under load fails
  no request and holds only v2; shard 1 (the only replica) restarted serves v2 within
  10 s while /readyz says 503 until it can; the ranker restarted (`--version v1`) comes
  up serving v2 within 10 s.
- Mid-rollout (a 50% canary bake): a restarted replica loads both versions before it
  serves, no request fails; the restarted ranker comes back with the 50/50 split.
- The controller SIGKILLed fails no request; a shard restarted meanwhile without the
  desired state (its --preload v1 only) keeps the ranker unready; the controller
  restarted with its command line repairs it (reconcile), shown in `deployctl status`
  and in deploy_controller_reconcile_repairs_total.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy_controller import cli
from loadtest.harness.probes import metric_sum
from loadtest.harness.process import ServerProcess
from loadtest.stack.commands import desired_state_file
from tests.stack import AUTH, MODEL, Load, Stack, start_stack

pytestmark = pytest.mark.slow

GATES = ("--gate-interval-s", "0.4", "--gate-min-requests", "10", "--gate-p99-slack-s", "0.5",
         "--gate-max-score-drift", "0.5", "--retry-backoff-s", "0.2",
         "--reconcile-interval-s", "1")
CONVERGE_S = 10.0  # the bound: serving again within 10 s of a restart


@pytest.fixture(scope="module")
def stack(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    spawned: list[ServerProcess] = []
    with start_stack(store, tmp_path_factory.mktemp("restart"), replicas=(2, 1),
                     gates=GATES) as s:
        s.spawned = spawned  # type: ignore[attr-defined]
        try:
            yield s
        finally:
            for p in reversed(spawned):
                p.stop(signal.SIGKILL if p.name.startswith("ctl") else signal.SIGTERM)


def _restart(stack: Stack, p: ServerProcess, tag: str) -> ServerProcess:
    """The same command line on the same port (the harness appends --port 0 --port-file)."""
    q = ServerProcess(p.argv[:-4], log_dir=stack.dir, name=f"{p.name}_{tag}", ready=p.ready,
                      port=p.port)
    q.port = p.port  # known before it is ready: the probes below address it meanwhile
    stack.spawned.append(q)  # type: ignore[attr-defined]
    for reps in stack.replicas:
        reps[:] = [q if r is p else r for r in reps]
    stack.shards = [reps[0] for reps in stack.replicas]
    if stack.ranker is p:
        stack.ranker = q
    return q.start()


def _kill(p: ServerProcess) -> None:
    p.stop(signal.SIGKILL)


def _ready(stack: Stack) -> tuple[int, str]:
    try:
        r = httpx.get(f"{stack.ranker_url}/readyz", timeout=5)
    except httpx.HTTPError as e:
        return 0, str(e)
    return r.status_code, r.text


def _until_ready(stack: Stack, status: int, timeout: float) -> float:
    """Seconds until /readyz answers `status`."""
    t0 = time.monotonic()
    while (got := _ready(stack))[0] != status:
        assert time.monotonic() - t0 < timeout, f"/readyz still {got} after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def _up(p: ServerProcess, timeout: float = 60.0) -> float:
    """Seconds from the process's start until it listens (its port file), which is after
    its startup loads. Interpreter and torch imports are in it: on a loaded 2-core machine
    they alone can take longer than the issue's 10 s, so the bound applies from here."""
    while not p.port_file.exists():
        p.check_alive()
        assert time.monotonic() - p.started_at < timeout, f"{p.name} not up:\n{p.log_tail()}"
        time.sleep(0.02)
    return time.monotonic() - p.started_at


def _rank_ok(stack: Stack, n: int = 10) -> set[str]:
    """n requests that must all succeed; the versions that answered."""
    out = set()
    with httpx.Client(base_url=stack.ranker_url, timeout=10) as c:
        for req in stack.requests[:n]:
            r = c.post("/v1/rank", json=req)
            assert r.status_code == 200, r.text
            out.add(r.json()["version"])
    return out


def _replica_versions(p: ServerProcess) -> dict[str, str]:
    import grpc

    from protos import embedding_pb2 as pb
    from protos import embedding_pb2_grpc as pbg

    with grpc.insecure_channel(p.address) as ch:
        resp = pbg.EmbeddingServiceStub(ch).ListVersions(  # type: ignore[no-untyped-call]
            pb.ListVersionsRequest(model=MODEL), timeout=5)
    return {v.version: pb.VersionState.Name(v.state).removeprefix("VERSION_STATE_")
            for v in resp.versions}


def _controller(stack: Stack, name: str, *extra: str) -> ServerProcess:
    ctl = stack.controller(name, stack.dir / "journal.sqlite", *extra)
    stack.spawned.append(ctl)  # type: ignore[attr-defined]
    return ctl.start().wait_ready()


def _rollout(ctl: ServerProcess, version: str, canary: list[int], bake_s: float) -> str:
    with httpx.Client(base_url=f"http://{ctl.address}", timeout=10) as c:
        r = c.post("/v1/rollouts", json={"model": MODEL, "version": version, "canary": canary,
                                         "bake_s": bake_s}, headers=AUTH)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def _rollout_state(ctl: ServerProcess, rid: str) -> dict[str, Any]:
    return dict(httpx.get(f"http://{ctl.address}/v1/rollouts/{rid}", timeout=10).json())


def _wait_for(ctl: ServerProcess, rid: str, step: str | None = None,
              timeout: float = 60.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while True:
        r = _rollout_state(ctl, rid)
        if (step is not None and r["step"] == step) or (
                step is None and r["status"] not in ("running", "rolling_back")):
            return r
        assert time.monotonic() - t0 < timeout, (step, r["step"], r["status"])
        time.sleep(0.1)


def test_restarts_after_a_rollout_with_the_controller_down(stack: Stack) -> None:
    ctl = _controller(stack, "ctl_a")
    r = _wait_for(ctl, _rollout(ctl, "v2", [100], 0.3))
    assert r["status"] == "succeeded", r["reason"]
    ctl.stop()  # from here on nobody can repair anything: the servers converge alone
    want = json.loads(desired_state_file(stack.token).read_text())["models"][MODEL]
    assert (want["active"], want["versions"], want["split"]) == ("v2", ["v2"], {"v2": 1.0})
    stack.assert_consistent("v2")

    # Shard 0 has 2 replicas: restarting one loses no request.
    with Load(stack) as load:
        time.sleep(0.5)
        victim = stack.replicas[0][1]
        _kill(victim)
        back = _restart(stack, victim, "a").wait_ready()
        assert _replica_versions(back) == {"v2": "READY"}  # not its --preload v1
        time.sleep(1.0)
    assert load.failures() == [], load.failures()[:5]
    assert {x.version for x in load.results} == {"v2"}

    # Shard 1 has one replica: the ranker says unready while it is gone, serves again soon.
    _kill(stack.replicas[1][0])
    _until_ready(stack, 503, 3.0)
    back = _restart(stack, stack.replicas[1][0], "a")
    shard_up, shard_s = _up(back), _until_ready(stack, 200, CONVERGE_S)
    assert _rank_ok(stack) == {"v2"}  # ready means it can serve: no 503 after a 200
    back.wait_ready()

    # The ranker, restarted with --version v1, serves v2 (the desired state).
    _kill(stack.ranker)
    ranker = _restart(stack, stack.ranker, "a")
    ranker_up, ranker_s = _up(ranker), _until_ready(stack, 200, CONVERGE_S)
    ranker.wait_ready()
    assert _rank_ok(stack) == {"v2"}
    stack.assert_consistent("v2")
    print(f"\nrestart after rollout, controller down: 2-replica shard 0: 0 failed of "
          f"{len(load.results)} requests; 1-replica shard 1: process up {shard_up:.2f} s "
          f"after its start, ranker ready {shard_s:.2f} s later; ranker: up {ranker_up:.2f} s, "
          f"ready {ranker_s:.2f} s later, serving v2")


def test_restarts_mid_rollout(stack: Stack) -> None:
    # A long bake, aborted once the restarts are checked; the gate must not fail it for
    # the seconds the ranker is down (restarted on purpose).
    ctl = _controller(stack, "ctl_b", "--gate-fail-after", "1000", "--gate-max-failures", "1000")
    rid = _rollout(ctl, "v1", [50, 100], 60.0)
    _wait_for(ctl, rid, "bake:0")
    with Load(stack) as load:
        time.sleep(0.3)
        victim = stack.replicas[0][1]
        _kill(victim)
        back = _restart(stack, victim, "b").wait_ready()
        assert _replica_versions(back) == {"v1": "READY", "v2": "READY"}
        time.sleep(0.5)
    assert load.failures() == [], load.failures()[:5]
    assert {x.version for x in load.results} == {"v1", "v2"}
    # The ranker (no load on it now: its restart fails requests) comes back on the split.
    _kill(stack.ranker)
    ranker = _restart(stack, stack.ranker, "b")
    ranker_up, ranker_s = _up(ranker), _until_ready(stack, 200, CONVERGE_S)
    ranker.wait_ready()
    st = stack.ranker_status()
    assert st["split"] == {"v1": 0.5, "v2": 0.5}, st
    assert _rank_ok(stack, 30) == {"v1", "v2"}
    assert _rollout_state(ctl, rid)["step"] == "bake:0"
    with httpx.Client(base_url=f"http://{ctl.address}", timeout=10) as c:
        assert c.post(f"/v1/rollouts/{rid}/abort", json={"reason": "test"},
                      headers=AUTH).status_code == 202
    r = _wait_for(ctl, rid)
    ctl.stop()
    assert r["status"] == "rolled_back", r["reason"]
    stack.assert_consistent("v2")
    print(f"\nmid-rollout: replica restart failed 0 of {len(load.results)} requests; ranker "
          f"up {ranker_up:.2f} s after its start, ready on the canary split {ranker_s:.2f} s "
          f"later")


def test_controller_restart_repairs_a_shard_started_without_the_desired_state(
        stack: Stack) -> None:
    ctl = _controller(stack, "ctl_c")
    with Load(stack) as load:  # the controller is off the request path: nothing may fail
        _kill(ctl)
        time.sleep(1.0)
    assert load.failures() == [] and len(load.results) > 20, load.failures()[:5]
    # While it is down, shard 1 restarts before any desired state reached it (a file
    # moved aside): it holds its --preload v1 only, and the ranker must not claim ready.
    path = desired_state_file(stack.token)
    aside = path.with_name("desired-state.aside")
    path.rename(aside)
    try:
        victim = stack.replicas[1][0]
        _kill(victim)
        back = _restart(stack, victim, "c").wait_ready()
        assert _replica_versions(back) == {"v1": "READY"}
        _until_ready(stack, 503, 3.0)
    finally:
        aside.rename(path)
    ctl = _restart(stack, ctl, "c").wait_ready()  # same command line: it reconciles
    repaired_s = _until_ready(stack, 200, CONVERGE_S)
    assert _replica_versions(back)["v2"] == "READY"
    assert _rank_ok(stack) == {"v2"}
    assert stack.ranker_status()["split"] == {"v2": 1.0}  # (shard 1 keeps its v1 too)
    out = io.StringIO()
    assert cli.main(["status", MODEL, "--controller", f"http://{ctl.address}"], out=out) == 0
    text = out.getvalue()
    assert "desired: active v2" in text and "reconcile (every 1 s" in text, text
    repairs = metric_sum(ctl, "deploy_controller_reconcile_repairs_total")
    assert repairs >= 1, repairs
    print(f"\ncontroller SIGKILLed: 0 failed of {len(load.results)} requests; restarted, it "
          f"repaired a shard started without the desired state, ranker ready {repaired_s:.2f} s "
          f"after the controller ({repairs:g} repairs)\n{text}")

"""`ranker-server --workers N`: one ranker, N processes on one port, one consistent rollout.

Real processes: a supervisor and two workers on a tiny store (--local-tables, CPU). A
load, a prepare and a split reach every worker; a worker that does not take a change
(SIGSTOPped) is killed and comes back in step; a SIGKILLed worker comes back with the
group's versions, split and delta seqs; the group is not ready meanwhile; SIGTERM drains them all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from loadtest.harness.process import ServerProcess
from modelpack.delta_write import write_delta
from tests.helpers_store import tiny_request, tiny_version

pytestmark = pytest.mark.slow
TOKEN = "group-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _admin_ready(s: ServerProcess) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{s.admin_port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    for i, v in enumerate(("v1", "v2"), start=1):
        tiny_version(store, v, seed=i)
    write_delta(store / "tiny" / "v2", {"cats": ([3], np.full((1, 16), 0.5, np.float32))})
    (store / "token").write_text(TOKEN)
    s = ServerProcess.module(
        "ranker_server", "--store", str(store), "--model", "tiny", "--version", "v1",
        "--local-tables", "--device", "cpu", "--workers", "2", "--admin-port", "0",
        "--admin-token-file", str(store / "token"), "--drain-timeout-s", "2",
        "--prepare-timeout-s", "1", "--log-level", "info",
        log_dir=tmp_path_factory.mktemp("logs"), name="group", ready=_admin_ready,
        env={"OMP_NUM_THREADS": "1"})
    s.start().wait_ready(timeout=120)
    yield s
    s.stop()


def _admin(s: ServerProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{s.admin_port}/admin/v1{path}",
                         headers=AUTH, timeout=30, **kw)


def _workers(s: ServerProcess) -> list[dict[str, Any]]:
    r = _admin(s, "GET", "/group")
    assert r.status_code == 200, r.text
    return list(r.json()["workers"])


def _own_listing(w: dict[str, Any]) -> dict[str, Any]:
    """A worker's versions, asked on its private admin port."""
    r = httpx.get(f"http://127.0.0.1:{w['admin_port']}/admin/v1/versions", headers=AUTH,
                  timeout=10)
    return dict(r.json())


def _own_split(w: dict[str, Any]) -> dict[str, float]:
    return dict(_own_listing(w)["split"])


def _own_seqs(w: dict[str, Any]) -> dict[str, int]:
    return {v["version"]: v["seq"] for v in _own_listing(w)["versions"]}


def _wait(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _rank_versions(s: ServerProcess, n: int) -> set[str]:
    """n requests on fresh connections (the kernel spreads them over the workers)."""
    seen = set()
    for i in range(n):
        r = httpx.post(f"http://127.0.0.1:{s.port}/v1/rank", json=tiny_request(3, seed=i),
                       timeout=10)
        assert r.status_code == 200, r.text
        seen.add(r.json()["version"])
    return seen


def _per_worker_requests(s: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ranker_requests_total{"):
            worker = line.split('worker="')[1].split('"')[0]
            out[worker] = out.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_every_worker_serves_and_takes_every_admin_change(group: ServerProcess) -> None:
    workers = _workers(group)
    assert [w["worker"] for w in workers] == [0, 1] and len({w["pid"] for w in workers}) == 2
    assert _rank_versions(group, 40) == {"v1"}
    per = _per_worker_requests(group)
    assert set(per) == {"0", "1"} and sum(per.values()) >= 40, per  # both took connections
    # A scrape of the data port (any worker) reads the whole group's metrics.
    data_metrics = httpx.get(f"http://127.0.0.1:{group.port}/metrics", timeout=5).text
    assert 'worker="0"' in data_metrics and 'worker="1"' in data_metrics
    for method, path, body in (("POST", "/versions", {"version": "v2"}),
                               ("POST", "/versions/v2/prepare", None),
                               ("PUT", "/split", {"split": {"v1": 0.5, "v2": 0.5}})):
        r = _admin(group, method, path, **({"json": body} if body is not None else {}))
        assert r.status_code == 200, (path, r.text)
    listing = _admin(group, "GET", "/versions").json()
    assert listing["split"] == {"v1": 0.5, "v2": 0.5}
    for w in _workers(group):  # every worker, asked directly: the same split
        assert w["ready"] and w["synced"] and _own_split(w) == {"v1": 0.5, "v2": 0.5}, w
    assert _rank_versions(group, 30) == {"v1", "v2"}
    r = _admin(group, "PUT", "/versions/v2/seq", json={"seq": 1})
    assert r.status_code == 200 and r.json()["seq"] == 1, r.text
    assert [_own_seqs(w) for w in _workers(group)] == [{"v1": 0, "v2": 1}] * 2
    r = _admin(group, "PUT", "/versions/v2/seq", json={"seq": 2})  # no delta 2: none took it
    assert r.status_code == 422 and "tiny/v2 delta 2" in r.json()["detail"], r.text
    # A refused change (nothing reached any worker) changes nothing and says why.
    r = _admin(group, "PUT", "/split", json={"split": {"v3": 1.0}})
    assert r.status_code == 409 and "v3" in r.json()["detail"]
    assert [w["pid"] for w in _workers(group)] == [w["pid"] for w in workers]
    # The admin port serves no ranking; the token is checked first.
    assert httpx.post(f"http://127.0.0.1:{group.admin_port}/v1/rank", json={}).status_code == 404
    assert httpx.put(f"http://127.0.0.1:{group.admin_port}/admin/v1/split",
                     json={"split": {"v1": 1.0}}).status_code == 401


def test_a_worker_that_misses_a_change_is_restarted_in_step(group: ServerProcess) -> None:
    before = _workers(group)
    os.kill(before[1]["pid"], signal.SIGSTOP)  # worker 1 will not answer the change
    try:
        r = _admin(group, "PUT", "/split", json={"split": {"v2": 1.0}})
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before[1]["pid"], signal.SIGCONT)
    assert r.status_code == 200, r.text
    _wait(lambda: httpx.get(f"http://127.0.0.1:{group.admin_port}/readyz").status_code == 503,
          5, "readiness to drop while worker 1 restarts")
    _wait(lambda: _admin_ready(group), 60, "the group to be ready again")
    after = _workers(group)
    assert after[0]["pid"] == before[0]["pid"] and after[1]["pid"] != before[1]["pid"]
    assert after[1]["restarts"] == before[1]["restarts"] + 1
    assert [_own_split(w) for w in after] == [{"v2": 1.0}] * 2
    assert _rank_versions(group, 20) == {"v2"}  # the new worker serves the group's split


def test_a_killed_worker_comes_back_with_the_groups_state(group: ServerProcess) -> None:
    before = _workers(group)
    os.kill(before[0]["pid"], signal.SIGKILL)
    _wait(lambda: httpx.get(f"http://127.0.0.1:{group.admin_port}/readyz").status_code == 503,
          5, "readiness to drop")
    _wait(lambda: _admin_ready(group), 60, "the group to be ready again")
    after = _workers(group)
    assert after[0]["pid"] != before[0]["pid"] and after[0]["synced"]
    assert _admin(group, "GET", "/versions").json()["split"] == {"v2": 1.0}
    assert _own_seqs(after[0])["v2"] == 1  # back at the group's delta seq
    assert _rank_versions(group, 20) == {"v2"}
    metrics = httpx.get(f"http://127.0.0.1:{group.admin_port}/metrics").text
    assert 'ranker_group_workers{state="ready"} 2' in metrics


def test_sigterm_drains_every_worker_and_exits_zero(group: ServerProcess) -> None:
    pids = [w["pid"] for w in _workers(group)]
    group.send(signal.SIGTERM)
    assert group.wait(timeout=30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

"""The ranker as deployed: real embedding shards + rankers on free ports, the demo model.

Processes (started per module, in parallel where they can be):
- shards s0, s1 of 2 over the demo store, v1 and v2 preloaded; ranker `main` on them;
- ranker `slow` on the same shards with a tiny queue and a long batch wait, for 429,
  504 and the SIGTERM drain;
- shards m0, m1 over a copy of the store, and ranker `victim` on them: m1 later swaps
  in another build of v1 (same name, other fingerprint), as a mis-deployed shard would.
Expected scores come from modelpack's OfflineScorer over the same INT4 files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from loadtest.harness.probes import http_ready
from loadtest.harness.process import ServerProcess, start_all
from modelpack.manifest import parse_manifest, write_manifest
from modelpack.scorer import OfflineScorer
from modelpack.train import auc
from protos import embedding_pb2 as epb
from protos import embedding_pb2_grpc as epbg
from protos import ranker_pb2
from ranker_server.codec import encode_request

TOKEN = "rank-admin"
DEMO = ["--rows", "4000", "--examples", "8000", "--eval-requests", "60", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "store"
    subprocess.run([sys.executable, "-m", "modelpack", "demo", "--store", str(root), *DEMO],
                   check=True, capture_output=True, timeout=600)
    return root


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("logs")
    (d / "token").write_text(TOKEN + "\n")
    return d


def eval_requests(store: Path, version: str = "v1") -> list[dict[str, Any]]:
    text = (store / "ads_ctr" / version / "eval.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def shard(store: Path, logs: Path, name: str, k: int) -> ServerProcess:
    return ServerProcess.module(
        "embedding_server", "--store", str(store), "--shard", str(k), "--num-shards", "2",
        "--preload", "ads_ctr/v1", "--preload", "ads_ctr/v2", "--admin-token-file",
        str(logs / "token"), log_dir=logs, name=name)


def ranker(store: Path, logs: Path, name: str, shards: list[ServerProcess], *args: str,
           wait_ready: bool = True) -> ServerProcess:
    return ServerProcess.module(
        "ranker_server", "--store", str(store), "--model", "ads_ctr", "--version", "v1",
        "--embedding-shards", ",".join(s.address for s in shards), "--device", "cpu",
        "--admin-token-file", str(logs / "token"), *args, log_dir=logs, name=name,
        ready=http_ready if wait_ready else None)


@pytest.fixture(scope="module")
def fleet(store: Path, logs: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, ServerProcess]]:
    copy = tmp_path_factory.mktemp("copy") / "store"
    shutil.copytree(store, copy)
    shards = start_all([shard(store, logs, "s0", 0), shard(store, logs, "s1", 1),
                        shard(copy, logs, "m0", 0), shard(copy, logs, "m1", 1)])
    rankers: list[ServerProcess] = []
    try:
        rankers = start_all([
            ranker(store, logs, "main", shards[:2], "--max-batch-wait-ms", "2"),
            ranker(store, logs, "slow", shards[:2], "--max-queue", "2", "--max-batch-wait-ms",
                   "500", "--no-eager-dispatch", "--drain-grace-s", "1"),
            ranker(copy, logs, "victim", shards[2:], "--max-batch-wait-ms", "1"),
        ])
        yield dict(zip(["s0", "s1", "m0", "m1", "main", "slow", "victim"], shards + rankers,
                       strict=True))
    finally:
        for p in shards + rankers:
            p.stop(signal.SIGKILL)


def url(s: ServerProcess, path: str) -> str:
    return f"http://{s.address}{path}"


def admin(s: ServerProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, url(s, "/admin/v1" + path), timeout=30,
                         headers={"authorization": f"Bearer {TOKEN}"}, **kw)


def metric(s: ServerProcess, sample: str) -> float:
    for line in httpx.get(url(s, "/metrics")).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def rank_all(s: ServerProcess, reqs: list[dict[str, Any]], workers: int = 8
             ) -> list[httpx.Response]:
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: client.post(url(s, "/v1/rank"), json=r), reqs))


def _raw_exchange(s: ServerProcess, head: str, body: bytes = b"") -> tuple[bytes, float]:
    """(status line + headers, seconds to them) of one request sent on a raw socket."""
    host, port = s.address.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return answer, time.monotonic() - started


def test_eval_scores_equal_offline_scores_and_auc(store: Path,
                                                  fleet: dict[str, ServerProcess]) -> None:
    reqs = eval_requests(store)
    answers = rank_all(fleet["main"], reqs)
    scorer = OfflineScorer(store / "ads_ctr" / "v1")
    scores, labels = [], []
    for r, a in zip(reqs, answers, strict=True):
        assert a.status_code == 200, a.text
        body = a.json()
        assert (body["request_id"], body["model"], body["version"]) == (r["request_id"],
                                                                         "ads_ctr", "v1")
        np.testing.assert_allclose(body["scores"], scorer.score(r), atol=2e-3, rtol=0)
        scores += body["scores"]
        labels += r["labels"]
    metrics = json.loads((store / "ads_ctr" / "v1" / "metrics.json").read_text())
    assert abs(auc(np.array(labels), np.array(scores)) - metrics["int4_auc"]) <= 1e-3


def test_json_and_protobuf_bodies_agree(store: Path, fleet: dict[str, ServerProcess]) -> None:
    req = eval_requests(store)[3]
    # Dense values as float32 numbers, so the JSON and the float32 protobuf columns are equal.
    req["user"]["user_activity"] = float(np.float32(req["user"]["user_activity"]))
    for c in req["candidates"]:
        c.update({k: float(np.float32(c[k])) for k in ("ad_ctr_prior", "ad_bid")})
    schema = OfflineScorer(store / "ads_ctr" / "v1").schema
    j = httpx.post(url(fleet["main"], "/v1/rank"), json=req)
    p = httpx.post(url(fleet["main"], "/v1/rank"), content=encode_request(req, schema),
                   headers={"content-type": "application/x-protobuf"})
    assert j.status_code == p.status_code == 200, (j.text, p.text)
    msg = ranker_pb2.RankResponse.FromString(p.content)
    assert (msg.request_id, msg.model, msg.version) == (req["request_id"], "ads_ctr", "v1")
    np.testing.assert_allclose(np.frombuffer(msg.scores, "<f4"), j.json()["scores"], atol=1e-6)


def test_canary_split_pins_each_request_to_one_version(store: Path,
                                                       fleet: dict[str, ServerProcess]) -> None:
    main = fleet["main"]
    assert admin(main, "POST", "/versions", json={"version": "v2"}).json()["state"] == "loaded"
    assert admin(main, "POST", "/versions/v2/prepare").json()["state"] == "prepared"
    r = admin(main, "PUT", "/split", json={"split": {"v1": 0.9, "v2": 0.1}})
    assert r.status_code == 200 and r.json()["split"] == {"v1": 0.9, "v2": 0.1}
    reqs = [dict(r, candidates=r["candidates"][:2]) for r in eval_requests(store)] * 7
    answers = rank_all(main, reqs, workers=12)
    assert all(a.status_code == 200 for a in answers)
    n, canary = len(answers), sum(a.json()["version"] == "v2" for a in answers)
    sd = (0.1 * 0.9 / n) ** 0.5
    assert abs(canary / n - 0.1) < 4.5 * sd, (canary, n)  # binomial: fails ~1e-5 of runs
    scorers = {v: OfflineScorer(store / "ads_ctr" / v) for v in ("v1", "v2")}
    for req, a in list(zip(reqs, answers, strict=True))[:120]:  # scored by the version it names
        np.testing.assert_allclose(a.json()["scores"], scorers[a.json()["version"]].score(req),
                                   atol=2e-3, rtol=0)
    assert metric(main, 'ranker_requests_total{code="200",version="v2"}') >= canary
    assert admin(main, "DELETE", "/versions/v2").status_code == 409  # still has traffic
    assert admin(main, "POST", "/versions/v1/activate").json()["split"] == {"v1": 1.0}
    left = admin(main, "DELETE", "/versions/v2").json()["versions"]
    assert [v["version"] for v in left] == ["v1"]


def test_admin_refuses_a_huge_body_without_token_before_reading_it(
        fleet: dict[str, ServerProcess]) -> None:
    main = fleet["main"]
    head = (f"PUT /admin/v1/split HTTP/1.1\r\nhost: {main.address}\r\ncontent-type: "
            f"application/json\r\ncontent-length: {10**12}\r\n\r\n")  # a terabyte, never sent
    answer, took = _raw_exchange(main, head, b'{"split": ')
    assert answer.startswith(b"HTTP/1.1 401 "), answer
    assert b"www-authenticate: bearer" in answer.lower()
    assert took < 2


def test_prepare_refuses_a_version_the_shards_do_not_hold(store: Path,
                                                          fleet: dict[str, ServerProcess]) -> None:
    main = fleet["main"]
    v3 = store / "ads_ctr" / "v3"  # a version only the ranker's store has
    shutil.copytree(store / "ads_ctr" / "v2", v3)
    raw = json.loads((v3 / "manifest.json").read_text())
    write_manifest(v3, dataclasses.replace(parse_manifest(raw), version="v3"))
    assert admin(main, "POST", "/versions", json={"version": "v3"}).status_code == 200
    r = admin(main, "POST", "/versions/v3/prepare")
    assert r.status_code == 409 and "shard 0 replica" in r.json()["detail"], r.text
    assert "does not hold ads_ctr/v3" in r.json()["detail"]
    assert admin(main, "PUT", "/split", json={"split": {"v3": 1.0}}).status_code == 409
    assert admin(main, "DELETE", "/versions/v3").status_code == 200


def test_overload_gets_429_and_expired_deadlines_504(store: Path,
                                                     fleet: dict[str, ServerProcess]) -> None:
    slow, req = fleet["slow"], eval_requests(store)[0]
    with ThreadPoolExecutor(1) as pool:
        # 2 queue for the 500 ms batch wait; while they wait, a request declaring a 1 MB
        # body (within the cap, never sent) is refused from its headers alone: had the
        # ranker waited for the body, no answer would come.
        queued = pool.submit(rank_all, slow, [req] * 2, 2)
        deadline = time.monotonic() + 5
        while (metric(slow, 'ranker_inflight_requests{version="v1"}') < 2
               and time.monotonic() < deadline):
            time.sleep(0.005)
        head = (f"POST /v1/rank HTTP/1.1\r\nhost: {slow.address}\r\n"
                f"content-type: application/json\r\ncontent-length: {10**6}\r\n\r\n")
        answer, took = _raw_exchange(slow, head, b'{"user": ')
        assert [a.status_code for a in queued.result()] == [200, 200]
    assert answer.startswith(b"HTTP/1.1 429 "), answer
    assert b"retry-after: 1" in answer.lower()
    assert took < 0.05, f"429 took {took * 1000:.1f} ms"
    answers = rank_all(slow, [req] * 6, workers=6)  # 2 may queue (500 ms), the rest are shed
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
    shed = next(a for a in answers if a.status_code == 429)
    assert shed.headers["retry-after"] == "1" and shed.json()["reason"] == "overloaded"
    late = httpx.post(url(slow, "/v1/rank"), json={**req, "timeout_ms": 50})
    assert late.status_code == 504 and late.json()["reason"] == "deadline", late.text
    assert metric(slow, 'ranker_errors_total{reason="overloaded"}') >= 1


def test_sigterm_drains_in_flight_requests_then_exits_0(
        store: Path, fleet: dict[str, ServerProcess]) -> None:
    slow, req = fleet["slow"], eval_requests(store)[1]
    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(url(slow, "/v1/rank"), json=req, timeout=30))) for _ in range(2)]
    for t in threads:
        t.start()
    while metric(slow, 'ranker_inflight_requests{version="v1"}') < 2:
        time.sleep(0.01)
    slow.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    time.sleep(0.1)
    ready = httpx.get(url(slow, "/readyz"))
    assert ready.status_code == 503 and "draining" in ready.json()["reason"]
    for t in threads:
        t.join(10)
    assert [r.status_code for r in results] == [200, 200]
    assert slow.proc.wait(20) == 0  # type: ignore[union-attr]


def _swap_v1_build(copy: Path, shard: ServerProcess) -> None:
    """Put v2's tables and weights under the name v1 in `copy`, and reload v1 on `shard`."""
    fresh = copy.parent / "v1-other-build"
    shutil.copytree(copy / "ads_ctr" / "v2", fresh)
    raw = json.loads((fresh / "manifest.json").read_text())
    write_manifest(fresh, dataclasses.replace(parse_manifest(raw), version="v1"))
    (copy / "ads_ctr" / "v1").rename(copy.parent / "v1-original")
    fresh.rename(copy / "ads_ctr" / "v1")
    auth = [("authorization", f"Bearer {TOKEN}")]
    with grpc.insecure_channel(shard.address) as ch:
        stub = epbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        stub.UnloadVersion(epb.UnloadVersionRequest(model="ads_ctr", version="v1"),
                           metadata=auth, timeout=30)
        info = stub.LoadVersion(epb.LoadVersionRequest(model="ads_ctr", version="v1"),
                                metadata=auth, timeout=30)
        assert info.state == epb.VERSION_STATE_READY


def test_a_shard_serving_another_build_yields_503s_never_scores(
        store: Path, logs: Path, fleet: dict[str, ServerProcess]) -> None:
    victim = fleet["victim"]
    reqs = eval_requests(store)[:20]
    assert all(a.status_code == 200 for a in rank_all(victim, reqs))
    good_fp = admin(victim, "GET", "/versions").json()["versions"][0]["fingerprint"]
    copy = Path(victim.argv[victim.argv.index("--store") + 1])
    _swap_v1_build(copy, fleet["m1"])
    answers = rank_all(victim, reqs)
    assert [a.status_code for a in answers] == [503] * len(reqs)
    for a in answers:
        assert "scores" not in a.json() and a.json()["reason"] == "version_mismatch"
        assert "ads_ctr/v1" in a.json()["detail"] and good_fp in a.json()["detail"]
    assert metric(victim, "ranker_version_mismatch_total") == len(reqs)
    assert metric(victim, 'ranker_requests_total{code="503",version="v1"}') == len(reqs)
    r = admin(victim, "POST", "/versions/v1/prepare")
    assert r.status_code == 409 and "shard 1 replica" in r.json()["detail"]
    assert good_fp in r.json()["detail"], r.text
    # A ranker starting against the mis-deployed shard stays unready, saying why.
    with ranker(store, logs, "late", [fleet["m0"], fleet["m1"]], wait_ready=False) as late:
        deadline = time.monotonic() + 20
        while "shard 1 replica" not in (reason := httpx.get(url(late, "/readyz")).text):
            assert time.monotonic() < deadline, reason
            time.sleep(0.1)
        assert httpx.get(url(late, "/readyz")).status_code == 503 and good_fp in reason
        r = httpx.post(url(late, "/v1/rank"), json=reqs[0])
        assert r.status_code == 503 and r.json()["reason"] == "no_active_version"

"""The ranker app in-process (local tables, tiny store): scores, batching, admin, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpack.scorer import OfflineScorer
from protos import ranker_pb2
from ranker_server.codec import encode_request
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import DELETE, TINY_SCHEMA, mutated_request, tiny_request, tiny_version

TOKEN = "let-me-in"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, v in enumerate(("v1", "v2", "corrupt"), start=1):
        tiny_version(root, v, seed=i)
    dense = root / "tiny" / "corrupt" / "dense.safetensors"
    data = bytearray(dense.read_bytes())
    data[-3] ^= 0x01
    dense.write_bytes(bytes(data))
    (root / "token").write_text(TOKEN)
    return root


def _config(store: Path, **kw: Any) -> RankerConfig:
    base = RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                        admin_token_file=store / "token", max_batch_wait_ms=5.0,
                        max_candidates=50, max_batch_candidates=400)
    return dataclasses.replace(base, **kw)


Body = Callable[[Any, Any], Awaitable[None]]


def run(store: Path, body: Body, **kw: Any) -> None:
    async def main() -> None:
        async with serve_in_process(_config(store, **kw)) as (client, state):
            await body(client, state)

    asyncio.run(main())


def test_concurrent_requests_batch_and_match_the_offline_scorer(store: Path) -> None:
    reqs = [tiny_request(1 + i % 7, seed=i) for i in range(40)]
    scorer = OfflineScorer(store / "tiny" / "v1")

    async def body(client: Any, state: Any) -> None:
        answers = await asyncio.gather(*(client.post("/v1/rank", json=r) for r in reqs))
        for r, a in zip(reqs, answers, strict=True):
            assert a.status_code == 200, a.text
            out = a.json()
            assert (out["request_id"], out["version"]) == (r["request_id"], "v1")
            np.testing.assert_allclose(out["scores"], scorer.score(r), atol=2e-3, rtol=0)
        batches = state.metrics.batch_candidates.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        assert count < len(reqs)  # concurrent requests shared device batches

    run(store, body)


def test_json_and_protobuf_bodies_give_the_same_scores(store: Path) -> None:
    req: dict[str, Any] = tiny_request(9, seed=5)
    req["user"]["user_activity"] = 0.75  # float32-exact, so both bodies carry the same value
    for c in req["candidates"]:
        c["ad_bid"] = float(np.float32(c["ad_bid"]))

    async def body(client: Any, state: Any) -> None:
        j = await client.post("/v1/rank", json=req)
        p = await client.post("/v1/rank", content=encode_request(req, TINY_SCHEMA),
                              headers={"content-type": "application/x-protobuf"})
        assert j.status_code == p.status_code == 200
        assert p.headers["content-type"] == "application/x-protobuf"
        msg = ranker_pb2.RankResponse.FromString(p.content)
        assert (msg.request_id, msg.model, msg.version) == (req["request_id"], "tiny", "v1")
        np.testing.assert_allclose(np.frombuffer(msg.scores, "<f4"), j.json()["scores"],
                                   atol=1e-6, rtol=0)

    run(store, body)


def _bad(path: list[Any], value: Any) -> dict[str, Any]:
    return mutated_request(path, DELETE if value is KeyError else value)


BAD_INPUTS = [
    (_bad(["user", "user_id"], "12"), 422, "user.user_id"),
    (_bad(["user", "user_id"], 1.5), 422, "user.user_id"),
    (_bad(["user", "user_id"], 2**64), 422, "user.user_id"),
    (_bad(["user", "user_recent"], 3), 422, "user.user_recent"),
    (_bad(["user", "user_recent", 1], "x"), 422, "user.user_recent[1]"),
    (_bad(["user", "user_activity"], float("nan")), 422, "user.user_activity"),
    (_bad(["user", "bogus"], 1), 422, "user.bogus"),
    (_bad(["user", "user_id"], KeyError), 422, "user.user_id"),
    (_bad(["candidates", 2, "ad_bid"], float("inf")), 422, "candidates[2].ad_bid"),
    (_bad(["candidates", 1, "ad_bid"], 1e300), 422, "candidates[1].ad_bid"),  # float32 overflow
    (_bad(["user", "user_activity"], -1e39), 422, "user.user_activity"),
    (_bad(["candidates", 1, "ad_id"], None), 422, "candidates[1].ad_id"),
    (_bad(["candidates"], []), 422, "candidates"),
    (_bad(["candidates"], [{"ad_id": 1, "ad_cat": 2, "ad_bid": 3.0}] * 51), 422, "candidates"),
    (_bad(["candidates"], {"a": 1}), 422, "candidates"),
    (_bad(["timeout_ms"], -5), 422, "timeout_ms"),
    (_bad(["timeout_ms"], "soon"), 422, "timeout_ms"),
    (_bad(["request_id"], 7), 422, "request_id"),
    (_bad(["surprise"], 1), 422, "surprise"),
    (_bad(["model"], "other_model"), 404, "model"),
    (_bad(["version"], "v404"), 404, "version"),
]


def test_bad_inputs_are_4xx_naming_the_field(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        for req, status, field in BAD_INPUTS:
            r = await client.post("/v1/rank", content=json.dumps(req),  # NaN/Infinity literals
                                  headers={"content-type": "application/json"})
            assert r.status_code == status, (field, r.text)
            assert r.json()["field"] == field and r.json()["detail"].startswith(field), r.text
        r = await client.post("/v1/rank", content=b'{"user": ')
        assert r.status_code == 400 and r.json()["field"] == "body"
        r = await client.post("/v1/rank", content=b"x" * 100,
                              headers={"content-length": "99999999"})
        assert r.status_code == 413

    run(store, body, max_body_bytes=4096)


def test_overload_is_429_with_retry_after(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        first = asyncio.create_task(client.post("/v1/rank", json=tiny_request(2)))
        while state.batcher.queued == 0:
            await asyncio.sleep(0.001)
        r = await client.post("/v1/rank", json=tiny_request(2))
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["reason"] == "overloaded"
        assert (await first).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'ranker_requests_total{code="429",version="none"} 1.0' in metrics
        assert 'ranker_errors_total{reason="overloaded"} 1.0' in metrics

    run(store, body, max_queue=1, max_batch_wait_ms=300.0, eager_dispatch=False)


def test_a_late_event_loop_sheds_until_it_catches_up(store: Path) -> None:
    async def admitted_within(seconds: float, client: Any) -> None:
        deadline = time.monotonic() + seconds
        while (await client.post("/v1/rank", json=tiny_request(2))).status_code != 200:
            assert time.monotonic() < deadline, "still shedding"
            await asyncio.sleep(0.02)

    async def body(client: Any, state: Any) -> None:
        await admitted_within(5, client)
        time.sleep(0.4)  # the loop stalls: its lag timer fires ~400 ms late
        await asyncio.sleep(0.01)  # as a served request, read after the loop's due timers ran
        r = await client.post("/v1/rank", json=tiny_request(2))
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert "event loop runs" in r.json()["detail"] and r.json()["reason"] == "overloaded"
        await admitted_within(5, client)  # once it has caught up

    run(store, body, shed_loop_lag_ms=100.0)


def test_rank_is_post_only_and_documented(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        r = await client.get("/v1/rank")
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
        op = (await client.get("/openapi.json")).json()["paths"]["/v1/rank"]["post"]
        assert set(op["requestBody"]["content"]) == {"application/json", "application/x-protobuf"}
        assert "429" in op["responses"]

    run(store, body)


def test_expired_deadline_is_504(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        r = await client.post("/v1/rank", json={**tiny_request(2), "timeout_ms": 5})
        assert r.status_code == 504 and r.json()["reason"] == "deadline", r.text
        metrics = (await client.get("/metrics")).text
        assert 'ranker_errors_total{reason="deadline"} 1.0' in metrics
        assert 'ranker_requests_total{code="504",version="v1"} 1.0' in metrics

    run(store, body, max_batch_wait_ms=200.0, eager_dispatch=False)


def test_admin_api(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        assert (await client.get("/admin/v1/versions")).status_code == 401
        r = await client.get("/admin/v1/versions", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await client.get("/admin/v1/versions", headers=AUTH)
        assert r.json()["active"] == "v1" and r.json()["split"] == {"v1": 1.0}

        async def admin(method: str, path: str, **kw: Any) -> Any:
            return await client.request(method, "/admin/v1" + path, headers=AUTH, **kw)

        assert (await admin("POST", "/versions", json={"version": "v9"})).status_code == 404
        r = await admin("POST", "/versions", json={"version": "corrupt"})
        assert r.status_code == 422 and "sha256" in r.json()["detail"]
        assert (await admin("POST", "/versions", json={"version": "../v1"})).status_code == 422
        assert (await admin("POST", "/versions", json=["v2"])).status_code == 422
        r = await admin("POST", "/versions", json={"version": "v2"})
        assert r.status_code == 200 and r.json()["state"] == "loaded"
        assert (await admin("POST", "/versions", json={"version": "v2"})).json() == r.json()
        r = await admin("PUT", "/split", json={"split": {"v1": 0.5, "v2": 0.5}})
        assert r.status_code == 409  # v2 is not prepared yet
        assert (await admin("POST", "/versions/v2/activate")).status_code == 409
        for bad in ("-1", "one", "99999"):  # the blue/green handshake's ?min_replicas=N
            r = await admin("POST", "/versions/v2/prepare", params={"min_replicas": bad})
            assert r.status_code == 422 and "min_replicas" in r.json()["detail"], bad
        r = await admin("POST", "/versions/v2/prepare", params={"min_replicas": "1"})
        assert r.status_code == 200 and r.json()["state"] == "prepared"
        r = await admin("PUT", "/split", json={"split": {"v1": 0.5, "v2": 0.4}})
        assert r.status_code == 422
        r = await admin("PUT", "/split", json={"split": {"v1": 0.75, "v2": 0.25}})
        assert r.status_code == 200 and r.json()["split"] == {"v1": 0.75, "v2": 0.25}
        assert (await admin("DELETE", "/versions/v2")).status_code == 409  # has traffic
        r = await admin("POST", "/versions/v2/activate")
        assert r.json()["active"] == "v2" and r.json()["split"] == {"v2": 1.0}
        scored = await client.post("/v1/rank", json=tiny_request(2))
        assert scored.json()["version"] == "v2"
        # v1 has no traffic now; a request still pinned to it holds the unload back.
        lease = state.registry.acquire("v1")
        r = await admin("DELETE", "/versions/v1", params={"timeout_s": 0.05})
        assert r.status_code == 409 and "in flight" in r.json()["detail"]
        unload = asyncio.create_task(admin("DELETE", "/versions/v1", params={"timeout_s": 5}))
        await asyncio.sleep(0.05)
        assert not unload.done()
        assert (await admin("GET", "/versions")).json()["versions"][0]["state"] == "unloading"
        lease.release()
        r = await unload
        assert r.status_code == 200 and [v["version"] for v in r.json()["versions"]] == ["v2"]
        metrics = (await client.get("/metrics")).text
        assert 'ranker_traffic_share{version="v2"} 1.0' in metrics
        assert 'version="v1"' not in metrics.split("ranker_traffic_share")[-1]

    run(store, body)


def test_admin_token_is_checked_before_the_body_is_read(store: Path) -> None:
    pulled: list[int] = []

    async def endless() -> Any:  # a body that never ends: reading it would hang
        while True:
            pulled.append(1)
            yield b"x" * 65536

    async def body(client: Any, state: Any) -> None:
        for method, path in (("POST", "/versions"), ("PUT", "/split"),
                             ("DELETE", "/versions/v1")):
            r = await asyncio.wait_for(client.request(
                method, "/admin/v1" + path, content=endless(),
                headers={"authorization": "Bearer nope"}), 5)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert pulled == []
        assert state.registry.versions["v1"].in_flight == 0  # nothing was loaded or unloaded

    run(store, body)


def test_a_bug_is_a_counted_500_and_the_lease_goes_back(store: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(client: Any, state: Any) -> None:
        def broken(*args: Any) -> Any:
            raise ZeroDivisionError("bug")

        monkeypatch.setattr(state.batcher, "submit", broken)  # fails holding the lease
        r = await client.post("/v1/rank", json=tiny_request(2))
        assert r.status_code == 500 and r.json() == {"detail": "internal error",
                                                     "reason": "internal"}
        monkeypatch.undo()
        assert state.registry.versions["v1"].in_flight == 0
        assert (await client.post("/v1/rank", json=tiny_request(2))).status_code == 200
        text = (await client.get("/metrics")).text
        for sample in ('ranker_errors_total{reason="internal"} 1.0',
                       'ranker_requests_total{code="500",version="v1"} 1.0',
                       'ranker_requests_total{code="200",version="v1"} 1.0',
                       'ranker_request_duration_seconds_count{outcome="server_error",'
                       'version="v1"} 1.0',
                       'ranker_inflight_requests{version="v1"} 0.0'):
            assert sample in text, sample

    run(store, body)


def test_admin_disabled_without_token_file(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        r = await client.get("/admin/v1/versions", headers=AUTH)
        assert r.status_code == 403 and "--admin-token-file" in r.json()["detail"]

    run(store, body, admin_token_file=None)


def test_health_readiness_and_metrics(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).json() == {"status": "ready", "active": "v1"}
        assert (await client.post("/v1/rank", json=tiny_request(3))).status_code == 200
        text = (await client.get("/metrics")).text
        for name in ("ranker_request_duration_seconds_bucket", "ranker_queue_wait_seconds_bucket",
                     "ranker_batch_candidates_bucket", "ranker_lookup_duration_seconds_bucket",
                     "ranker_device_forward_seconds_bucket", "ranker_version_mismatch_total",
                     'ranker_requests_total{code="200",version="v1"} 1.0',
                     'ranker_scores_total{version="v1"} 3.0', 'ranker_score_sum{version="v1"}',
                     'ranker_inflight_requests{version="v1"} 0.0',
                     'ranker_traffic_share{version="v1"} 1.0'):
            assert name in text, name
        state.begin_drain()
        r = await client.get("/readyz")
        assert r.status_code == 503 and "draining" in r.json()["reason"]

    run(store, body)

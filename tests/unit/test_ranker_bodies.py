"""The ranker's bodies: the admin API refuses bad bodies with a 4xx naming the problem
(never 500), and /v1/rank does not parse a JSON body bigger than any real request on the
event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ranker_server import codec
from ranker_server.admin import MAX_ADMIN_BODY_BYTES
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_request, tiny_version

TOKEN = "let-me-in"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = "application/json"

# (body, content type, status, words the detail holds), sent to both admin routes with a body
BAD_ADMIN_BODIES = [
    (b"\x80", JSON, 400, "UTF-8"),
    (b'{"version": "v2"', JSON, 400, "not valid JSON"),
    (b'{"version": "v2"}', "text/plain", 415, "text/plain"),
    (b"\x80\x81", "", 400, "UTF-8"),
    (b"\x00\x01\x02\xff", "application/octet-stream", 415, "octet-stream"),
    (b"version=v2", "application/x-www-form-urlencoded", 415, "form"),
    (b"\n\x02v2", "application/x-protobuf", 415, "protobuf"),
    (b'{"version": NaN, "split": {"v1": NaN}}', JSON, 400, "NaN"),
    (b'{"version": Infinity, "split": {"v1": Infinity}}', JSON, 400, "Infinity"),
    (b'{"version": 1e400, "split": {"v1": 1e400}}', JSON, 400, "1e400"),
    (b'{"version": 1, "split": {"v1": ' + b"9" * 400 + b"}}", JSON, 400, "64 bits"),
    (b"[" * 5000 + b"]" * 5000, JSON, 400, "nested"),
    (b"[1, 2]", JSON, 422, "object"),
]
ADMIN_ROUTES = [("POST", "/admin/v1/versions"), ("PUT", "/admin/v1/split")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    tiny_version(root, "v1", seed=1)
    (root / "token").write_text(TOKEN)
    return root


def run(store: Path, body: Any) -> None:
    config = RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                          admin_token_file=store / "token", max_batch_wait_ms=0.0,
                          max_candidates=50, max_batch_candidates=400)

    async def main() -> None:
        async with serve_in_process(config) as (client, state):
            await body(client, state)

    asyncio.run(main())


def test_admin_bad_bodies_are_4xx_naming_the_problem(store: Path) -> None:
    async def body(client: Any, state: Any) -> None:
        for method, path in ADMIN_ROUTES:
            for raw, ctype, status, needle in BAD_ADMIN_BODIES:
                headers = {**AUTH, "content-type": ctype} if ctype else AUTH
                r = await client.request(method, path, content=raw, headers=headers)
                assert r.status_code == status, (path, raw[:40], r.text)
                assert needle in r.json()["detail"], (path, raw[:40], r.text)
                # Without the token: 401 whatever the body.
                r = await client.request(method, path, content=raw,
                                         headers={"content-type": ctype or JSON})
                assert r.status_code == 401, (path, raw[:40], r.text)
        assert state.registry.active == "v1" and state.registry.split == {"v1": 1.0}

    run(store, body)


def test_admin_bodies_over_the_limit_are_413(store: Path) -> None:
    big = json.dumps({"version": "x" * MAX_ADMIN_BODY_BYTES}).encode()

    async def chunks() -> Any:  # no content-length: counted while read
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    async def body(client: Any, state: Any) -> None:
        for method, path in ADMIN_ROUTES:
            r = await client.request(method, path, content=big,
                                     headers={**AUTH, "content-type": JSON})
            assert r.status_code == 413 and str(MAX_ADMIN_BODY_BYTES) in r.json()["detail"], r.text
            r = await client.request(method, path, content=chunks(),
                                     headers={**AUTH, "content-type": JSON})
            assert r.status_code == 413, r.text

    run(store, body)


def test_rank_refuses_a_big_json_body_without_parsing_it(store: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """16 MB of ignored labels was parsed on the event loop for 0.3 s (others' p99 10 ->
    294 ms): a JSON body past MAX_JSON_BODY_BYTES is now refused before json.loads."""
    parsed: list[int] = []
    loads = json.loads

    def spy(s: Any, *args: Any, **kw: Any) -> Any:
        parsed.append(len(s))
        return loads(s, *args, **kw)

    request = tiny_request(3)
    labelled = json.dumps({**request, "labels": [0, 1, 0]}).encode()
    flood = json.dumps({**request, "labels": [0, 1] * (5 << 19)}).encode()  # 15.7 MB
    assert len(flood) > codec.MAX_JSON_BODY_BYTES

    async def body(client: Any, state: Any) -> None:
        monkeypatch.setattr(json, "loads", spy)  # codec calls json.loads
        r = await client.post("/v1/rank", content=flood, headers={"content-type": JSON})
        monkeypatch.undo()
        assert r.status_code == 413, r.text[:300]
        assert r.json()["field"] == "body" and "protobuf" in r.json()["detail"], r.text
        assert str(codec.MAX_JSON_BODY_BYTES) in r.json()["detail"]
        assert max(parsed, default=0) <= codec.MAX_JSON_BODY_BYTES, parsed
        # Labels of a real request are still accepted (and ignored).
        ok = await client.post("/v1/rank", content=labelled, headers={"content-type": JSON})
        assert ok.status_code == 200 and len(ok.json()["scores"]) == 3, ok.text

    run(store, body)


def test_protobuf_bodies_keep_the_larger_limit(store: Path) -> None:
    # The JSON limit is no cap on protobuf: a body past it is parsed (and answered 422
    # for its candidate count here), not refused for its size.
    async def body(client: Any, state: Any) -> None:
        from protos import ranker_pb2

        msg = ranker_pb2.RankRequest(request_id="x" * (codec.MAX_JSON_BODY_BYTES + 10),
                                     num_candidates=1)
        r = await client.post("/v1/rank", content=msg.SerializeToString(),
                              headers={"content-type": "application/x-protobuf"})
        assert r.status_code == 422 and r.json()["field"] == "request_id", r.text

    run(store, body)

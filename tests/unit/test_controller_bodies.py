"""The controller's API refuses bad bodies with a 4xx naming the problem, never a 500;
the token is checked before any body is read; /readyz says whether the journal and
discovery work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deploy_controller import app as app_module
from deploy_controller.app import MAX_BODY_BYTES, build_app
from deploy_controller.discovery import Topology
from deploy_controller.fake import FakeFleet
from tests.unit.controller_helpers import AUTH, MakeConfig

MUTATING = ["/v1/rollouts", "/v1/rollouts/r-x/abort", "/v1/models/m/rollback"]
JSON = {"content-type": "application/json"}

# (body, content type, status, words the answer's detail holds)
BAD_BODIES = [
    (b"\x80", "application/json", 400, "UTF-8"),
    (b'{"model": "m", "version": "v2"', "application/json", 400, "not valid JSON"),
    (b'{"model": "m", "version": "v2"}', "text/plain", 415, "text/plain"),
    (b"\x80\x81", "", 400, "UTF-8"),
    (b"\x00\x01\x02\xff", "application/octet-stream", 415, "application/octet-stream"),
    (b"model=m&version=v2", "application/x-www-form-urlencoded", 415, "form"),
    (b"\n\x01m\x12\x02v2", "application/x-protobuf", 415, "protobuf"),
    (b'{"model": "m", "version": "v2", "bake_s": NaN}', "application/json", 400, "NaN"),
    (b'{"model": "m", "version": "v2", "bake_s": Infinity}', "application/json", 400,
     "Infinity"),
    (b'{"model": "m", "version": "v2", "bake_s": -Infinity}', "application/json", 400,
     "Infinity"),
    (b'{"model": "m", "version": "v2", "bake_s": 1e400}', "application/json", 400, "1e400"),
    (b'{"model": "m", "version": "v2", "canary": [1e400]}', "application/json", 400, "1e400"),
    (b'{"model": "m", "version": "v2", "bake_s": ' + b"9" * 400 + b"}", "application/json",
     400, "64 bits"),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400, "nested"),
    (b"[1, 2]", "application/json", 422, "object"),
    (b'"v2"', "application/json", 422, "object"),
]


@pytest.fixture
def client(controller_config: MakeConfig) -> Iterator[TestClient]:
    with TestClient(build_app(controller_config(), fleet=FakeFleet())) as c:
        yield c


@pytest.mark.parametrize("path", MUTATING)
@pytest.mark.parametrize(("body", "ctype", "status", "needle"), BAD_BODIES)
def test_bad_bodies_are_4xx_naming_the_problem(client: TestClient, path: str, body: bytes,
                                               ctype: str, status: int, needle: str) -> None:
    headers = {**AUTH, "content-type": ctype} if ctype else AUTH
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert needle in str(r.json()["detail"]), r.text
    # The connection is still good for the next request.
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path", MUTATING)
def test_the_token_is_checked_before_the_body(client: TestClient, path: str) -> None:
    for body, ctype, _, _ in BAD_BODIES:
        r = client.post(path, content=body, headers={"content-type": ctype or "text/plain"})
        assert r.status_code == 401, (body[:40], r.text)
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", MUTATING)
def test_bodies_over_the_limit_are_413(client: TestClient, path: str) -> None:
    big = b'{"reason": "' + b"x" * MAX_BODY_BYTES + b'"}'
    r = client.post(path, content=big, headers={**AUTH, **JSON})
    assert r.status_code == 413 and str(MAX_BODY_BYTES) in r.json()["detail"], r.text

    # Without a content-length (chunked), the count while reading refuses it too.
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = client.post(path, content=chunks(), headers={**AUTH, **JSON})
    assert r.status_code == 413, r.text
    # A declared size past the limit is refused without waiting for the body.
    r = client.post(path, content=b"{}", headers={**AUTH, **JSON, "content-length": "99999999"})
    assert r.status_code == 413


def test_validation_errors_name_the_field_without_echoing_the_input(client: TestClient) -> None:
    r = client.post("/v1/rollouts", json={"model": "m", "version": "v2", "bake_s": "soon"}, headers=AUTH)
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["bake_s"] and "input" not in err, err
    r = client.post("/v1/rollouts", json={"model": "m"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["version"], r.text
    r = client.post("/v1/rollouts", content=b"", headers={**AUTH, **JSON})
    assert r.status_code == 422 and "required" in str(r.json()["detail"]), r.text
    # A bad query parameter: 422 too (the default handler's path, without the input).
    r = client.get("/v1/history", params={"limit": "\x80x"})
    assert r.status_code == 422 and "input" not in r.json()["detail"][0], r.text


def test_good_bodies_still_work(client: TestClient) -> None:
    # No content type at all is read as JSON (curl -X POST without -H).
    r = client.post("/v1/rollouts", content=b'{"model": "m", "version": "v2", "bake_s": 0}',
                    headers=AUTH)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    a = client.post(f"/v1/rollouts/{rid}/abort", headers={**AUTH, **JSON},
                    content=b'{"reason": "enough"}')
    assert a.status_code in (202, 409), a.text  # 409: it may already have finished
    empty = client.post("/v1/models/m/rollback", headers={**AUTH, "content-type": "text/plain"})
    assert empty.status_code in (202, 409), empty.text  # an empty body is no body


def test_openapi_documents_the_request_bodies(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    create = doc["paths"]["/v1/rollouts"]["post"]["requestBody"]
    assert create["required"] is True
    schema = create["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"model", "version"} and "bake_s" in schema["properties"]
    for path in ("/v1/rollouts/{rollout_id}/abort", "/v1/models/{model}/rollback"):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is False and "reason" in str(body["content"]), body


def test_readyz_needs_the_journal_and_discovery(controller_config: MakeConfig,
                                                tmp_path: Path) -> None:
    cfg = controller_config()
    with TestClient(build_app(cfg)) as c:  # the real fleet, found through the fleet file
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text
        assert c.get("/healthz").status_code == 200
        assert cfg.fleet is not None
        cfg.fleet.write_text("{not json")
        time.sleep(1.1)  # past the cached answer
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        assert "discovery" in r.json()["reason"] and "invalid JSON" in r.json()["reason"]
        assert c.get("/healthz").status_code == 200  # alive all the same
        cfg.fleet.write_text('{"rankers": [], "embedding_shards": [["x:1"]]}')
        time.sleep(1.1)
        assert c.get("/readyz").status_code == 200
        c.app.state.controller.journal.close()  # type: ignore[attr-defined]
        r = c.get("/readyz")
        assert r.status_code == 503 and "journal" in r.json()["reason"], r.text


def test_readyz_says_when_discovery_hangs(controller_config: MakeConfig,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class Hanging(FakeFleet):
        async def topology(self) -> Topology:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    monkeypatch.setattr(app_module, "DISCOVERY_TIMEOUT_S", 0.05)
    with TestClient(build_app(controller_config(), fleet=Hanging())) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "no fleet listing within" in r.json()["reason"], r.text

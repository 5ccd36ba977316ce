"""The delta routes of the controller's HTTP API and `deployctl delta` over them."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy_controller import cli, delta_cli
from deploy_controller.app import build_app
from deploy_controller.fake import FakeFleet
from modelpack.delta_write import write_delta
from tests.helpers_store import tiny_version
from tests.unit.controller_helpers import AUTH, MakeConfig
from tests.unit.delta_helpers import update


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    tiny_version(store, "v1", model="m")
    rng = np.random.default_rng(1)
    for _ in range(3):
        write_delta(store / "m" / "v1", {"unified": update(rng)})
    return store


@pytest.fixture
def client(built: Path, tmp_path: Path, controller_config: MakeConfig) -> Iterator[TestClient]:
    store = tmp_path / "store"
    shutil.copytree(built, store)
    cfg = controller_config(store=store, delta_poll_s=0.0, delta_gate_s=0.0)
    with TestClient(build_app(cfg, fleet=FakeFleet())) as c:
        yield c


def _settled(c: TestClient, seq: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st: dict[str, Any] = c.get("/v1/deltas/m").json()
        if st["state"] != "advancing" and st["committed_seq"] == seq:
            return st
        time.sleep(0.01)
    raise AssertionError(f"not committed at {seq}: {st}")


def test_token_is_checked_before_the_body_is_read(client: TestClient) -> None:
    for path in ("advance", "revert", "pause", "resume"):
        r = client.post(f"/v1/deltas/m/{path}", content=b"{not json",
                        headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
    assert client.get("/v1/deltas").status_code == 200  # reads are open


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("advance", {"to": "3"}, 422, "to"),
    ("advance", {"to": -1}, 422, "to"),
    ("advance", {"to": 1.5}, 422, "to"),
    ("advance", {"to": True}, 422, "to"),
    ("advance", {"extra": 1}, 422, "extra"),
    ("advance", [], 422, "JSON object"),
    ("advance", {"to": 9}, 404, "no delta 9"),
    ("revert", None, 422, "body: required"),
    ("revert", {"reason": "x"}, 422, "to"),
    ("revert", {"to": 2}, 409, "delta advance --to 2"),
    ("pause", {"reason": 5}, 422, "reason"),
])
def test_bad_bodies_are_refused_naming_the_field(client: TestClient, path: str, body: Any,
                                                 status: int, needle: str) -> None:
    r = client.post(f"/v1/deltas/m/{path}", content=b"" if body is None else json.dumps(body),
                    headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if isinstance(detail, list):  # a field's validation error: named by its location
        assert needle in [str(x) for e in detail for x in e["loc"]], detail
    else:
        assert needle in detail


def test_bad_model_and_raw_nan(client: TestClient) -> None:
    r = client.post("/v1/deltas/bad name!/advance", headers=AUTH)
    assert r.status_code == 422 and "model" in r.json()["detail"]
    r = client.post("/v1/deltas/m/advance", content=b'{"to": NaN}',
                    headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400, r.text


def test_advance_revert_pause_resume_over_http(client: TestClient) -> None:
    r = client.post("/v1/deltas/m/advance", json={"to": 2}, headers=AUTH)
    assert r.status_code == 202 and r.json()["to_seq"] == 2
    st = _settled(client, 2)
    assert st["newest_seq"] == 3 and st["state"] == "manual"
    assert [x["seq"] for x in st["rankers"]] == [2, 2]
    assert all(2 in x["readable_seqs"] for x in st["replicas"]) and len(st["replicas"]) == 4
    assert client.post("/v1/deltas/m/pause", json={"reason": "lunch"},
                       headers=AUTH).json()["pause_reason"] == "lunch"
    assert client.get("/v1/deltas").json()["streams"][0]["state"] == "paused"
    assert client.post("/v1/deltas/m/resume", headers=AUTH).json()["paused"] == ""
    r = client.post("/v1/deltas/m/revert", json={"to": 0, "reason": "drill"}, headers=AUTH)
    assert r.status_code == 202
    st = _settled(client, 0)
    assert st["paused"] == "operator" and "drill" in st["pause_reason"]


class _Api:
    """delta_cli's Api over the TestClient (cli.Api's call, minus the network)."""

    def __init__(self, c: TestClient) -> None:
        self.c = c

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
        r = self.c.request(method, path, json=body, params=params, headers=AUTH)
        if r.status_code >= 400:
            raise cli.CliError(f"HTTP {r.status_code}: {r.json()['detail']}")
        out: dict[str, Any] = r.json()
        return out


def _ctl(c: TestClient, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    args = cli.build_parser().parse_args(["delta", *argv])
    return delta_cli.run(_Api(c), args, out), out.getvalue()


def test_deployctl_delta(client: TestClient) -> None:
    code, text = _ctl(client, "advance", "m", "--poll", "0.01")
    assert code == 0 and "advance 0 -> 3: committed" in text
    code, text = _ctl(client, "status", "m")
    assert code == 0 and "committed seq 3  newest on disk 3" in text
    assert "ranker http://ranker-0  seq 3" in text and "readable [0, 3]" in text
    code, text = _ctl(client, "revert", "m", "--to", "1", "--reason", "why", "--poll", "0.01")
    assert code == 0 and "revert 3 -> 1: committed" in text
    code, text = _ctl(client, "status")
    assert "paused (operator): reverted to seq 1 by operator: why" in text
    assert _ctl(client, "resume", "m")[1].endswith("following\n")
    with pytest.raises(cli.CliError, match="already there"):
        _ctl(client, "advance", "m", "--to", "1")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["delta", "revert", "m", "--to", "-2"])

"""R6: nothing a client sends gets a 5xx or crashes a server.

- OpenAPI fuzz: every operation of the ranker's and the deploy controller's OpenAPI
  documents, requests generated from the documents themselves (path and query
  parameters, JSON bodies from the request schemas, plus type-confused values, junk
  bodies, odd content types, with and without the admin token): >= 1000 cases, 0 5xx.
  POST /v1/rank's bodies are covered in depth by tests/unit/test_ranker_property.py;
  here it is one operation among the others. Both apps run in-process (the ranker on a
  tiny store with local tables, the controller over the in-memory FakeFleet), so a
  mutating call with the right token really loads, prepares, activates, unloads, or
  starts and aborts rollouts while the fuzz goes on.
- The fuzz is deterministic (derandomized, no example database), and every body that
  once gave a 500 is sent to every body-taking operation before the generated cases
  (KNOWN_BAD_BODIES), with and without the token: each gets a 4xx.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import strategies as st

from deploy_controller.app import build_app
from deploy_controller.config import ControllerConfig
from deploy_controller.fake import FakeFleet
from deploy_controller.gates import GateConfig
from ranker_server.app import create_app
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.e2e.openapi_fuzz import (
    CASES_PER_APP,
    KNOWN,
    TOKEN,
    fuzz,
    names,
    operations,
    report,
)
from tests.helpers_store import tiny_request

pytestmark = pytest.mark.slow


def test_r6_ranker_openapi_fuzz_never_5xx(tiny_store: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    config = RankerConfig(store=tiny_store, model="tiny", version="v1", local_tables=True,
                          max_batch_wait_ms=0.0, max_candidates=20, default_timeout_ms=10_000,
                          max_timeout_ms=10_000, admin_token_file=token)
    doc = create_app(config).openapi()
    loop = asyncio.new_event_loop()
    app = serve_in_process(config)
    client, state = loop.run_until_complete(app.__aenter__())
    try:
        def send(method: str, url: str, query: dict[str, str], body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, str]:
            r = loop.run_until_complete(client.request(method, url, params=query, content=body,
                                                       headers=headers, timeout=30))
            return r.status_code, r.text

        versions = st.sampled_from(["v1", "v2", "v3"])
        seen = fuzz(doc, send, CASES_PER_APP, {
            "POST /admin/v1/versions": st.fixed_dictionaries({"version": versions}),
            "PUT /admin/v1/split": st.builds(lambda a, b, p: {"split": {a: p, b: 1 - p}},
                                             versions, versions, st.sampled_from([0.0, 0.5, 1.0]))})
        # Still serving after all of it: a valid request is scored by the active version.
        r = loop.run_until_complete(client.post("/v1/rank", json=tiny_request(3)))
        assert r.status_code == 200 and len(r.json()["scores"]) == 3, r.text
        assert state.registry.active in ("v1", "v2")
    finally:
        loop.run_until_complete(app.__aexit__(None, None, None))
        loop.close()
    print("\nR6 " + report("ranker OpenAPI", seen))
    assert sum(seen.values()) >= CASES_PER_APP
    assert len({op for op, _ in seen}) == len(operations(doc))
    assert any(s == 200 for (op, s) in seen if op.startswith("POST /admin")), seen


# ------------------------------------------------------------------ OpenAPI: controller


def test_r6_controller_openapi_fuzz_never_5xx(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "fleet.json").write_text('{"rankers": [], "embedding_shards": [["x:1"]]}')
    cfg = replace(ControllerConfig(journal=tmp_path / "journal.sqlite",
                                   admin_token_file=tmp_path / "token",
                                   fleet=tmp_path / "fleet.json", default_bake_s=0.0,
                                   gate_interval_s=0.01, retry_backoff_s=0.001,
                                   gates=GateConfig(min_requests=10))).validate()
    fleet = FakeFleet(model="m", versions=("v1", "v2", "v3"))
    app = build_app(cfg, fleet=fleet)
    doc = app.openapi()
    with TestClient(app, raise_server_exceptions=True) as c:
        def send(method: str, url: str, query: dict[str, str], body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, str]:
            if KNOWN in url:  # stands for the id of a real rollout, if there is one yet
                known = [r["id"] for r in c.get("/v1/history").json()["rollouts"]]
                url = url.replace(KNOWN, known[0] if known else "r-none")
            r = c.request(method, url, params=query, content=body, headers=headers)
            return r.status_code, r.text

        seen = fuzz(doc, send, CASES_PER_APP, {
            "POST /v1/rollouts": st.fixed_dictionaries(
                {"model": st.just("m"), "version": st.sampled_from(["v1", "v2", "v3"])},
                optional={"canary": st.sampled_from([[100], [50, 100], [10, 50, 100]]),
                          "bake_s": st.sampled_from([0, 0.01])}),
            "POST /v1/rollouts/{rollout_id}/abort": st.fixed_dictionaries({"reason": names}),
            "POST /v1/models/{model}/rollback": st.fixed_dictionaries({"bake_s": st.just(0)})})
        deadline = time.monotonic() + 10
        while c.get("/v1/rollouts").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/healthz").status_code == 200
    print("\nR6 " + report("controller OpenAPI", seen))
    assert sum(seen.values()) >= CASES_PER_APP
    assert len({op for op, _ in seen}) == len(operations(doc))
    assert any(s == 202 for (op, s) in seen if op == "POST /v1/rollouts"), seen
    assert fleet.violations == [], fleet.violations[:3]

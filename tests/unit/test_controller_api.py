"""The HTTP API over the in-memory fleet: auth, 409s, abort, rollback, history, metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from deploy_controller.app import build_app
from deploy_controller.config import ConfigError, ControllerConfig
from deploy_controller.fake import FakeFleet
from tests.unit.controller_helpers import AUTH, MakeConfig, wait_done


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet()


@pytest.fixture
def client(controller_config: MakeConfig, fleet: FakeFleet) -> Iterator[TestClient]:
    with TestClient(build_app(controller_config(), fleet=fleet)) as c:
        yield c


def test_mutating_calls_need_the_token(client: TestClient) -> None:
    body = {"model": "m", "version": "v2"}
    assert client.post("/v1/rollouts", json=body).status_code == 401
    bad = client.post("/v1/rollouts", json=body, headers={"authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    assert client.post("/v1/rollouts/r-x/abort").status_code == 401
    assert client.post("/v1/models/m/rollback").status_code == 401
    assert client.get("/v1/history").status_code == 200  # reads are open
    assert client.get("/healthz").json()["status"] == "ok"


def test_rollout_runs_and_second_one_gets_409(client: TestClient, fleet: FakeFleet) -> None:
    gate = {"open": False}

    def hold(op: str, server: str) -> None:
        if op == "ranker_prepare" and not gate["open"]:
            time.sleep(0.05)  # keep the first rollout busy long enough to collide

    fleet.hooks.append(hold)
    r = client.post("/v1/rollouts", json={"model": "m", "version": "v2", "canary": [50, 100],
                                          "bake_s": 0}, headers=AUTH)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    second = client.post("/v1/rollouts", json={"model": "m", "version": "v3"}, headers=AUTH)
    assert second.status_code == 409 and rid in second.json()["detail"]
    gate["open"] = True
    done = wait_done(client, rid)
    assert done["status"] == "succeeded" and done["phase"] == "done"
    assert [e["event"] for e in done["events"]][:2] == ["begin", "end"]
    assert all("baseline" not in e["detail"] for e in done["events"])
    assert fleet.serving() == {"v2"}
    hist = client.get("/v1/history", params={"model": "m"}).json()["rollouts"]
    assert [h["id"] for h in hist] == [rid]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "m", "version": "../etc"}, 422, "invalid version"),
    ({"model": "m", "version": "v1"}, 409, "already the active"),
    ({"model": "m", "version": "v2", "canary": [50, 20]}, 422, "increasing"),
    ({"model": "m", "version": "v2", "bake_s": -1}, 422, ""),
    ({"model": "m", "version": "v2", "extra": 1}, 422, ""),
    ({"model": "other", "version": "v2"}, 409, "no ranker serves model"),
])
def test_bad_requests_are_refused(client: TestClient, body: dict[str, Any], status: int,
                                  needle: str) -> None:
    r = client.post("/v1/rollouts", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert needle in str(r.json()["detail"])


@pytest.mark.parametrize(("budget", "strategy", "needle"), [
    (150, "in-place", "--strategy blue-green"),  # two do not fit; blue/green would
    (50, None, "does not fit a shard replica even alone"),
])
def test_does_not_fit_is_refused_up_front(client: TestClient, fleet: FakeFleet, budget: int,
                                          strategy: str | None, needle: str) -> None:
    fleet.budget_bytes = budget
    body = {"model": "m", "version": "v2"} | ({"strategy": strategy} if strategy else {})
    r = client.post("/v1/rollouts", json=body, headers=AUTH)
    assert r.status_code == 507
    assert needle in r.json()["detail"]
    assert client.get("/v1/history").json()["rollouts"] == []


def test_inconsistent_fleet_is_refused(client: TestClient, fleet: FakeFleet) -> None:
    fleet.rankers["http://ranker-1"].split = {"v1": 0.5, "v3": 0.5}
    r = client.post("/v1/rollouts", json={"model": "m", "version": "v2"}, headers=AUTH)
    assert r.status_code == 409 and "disagree" in r.json()["detail"]


def test_abort_rolls_back_and_then_409(client: TestClient, fleet: FakeFleet) -> None:
    r = client.post("/v1/rollouts", json={"model": "m", "version": "v2", "bake_s": 30},
                    headers=AUTH).json()
    deadline = time.monotonic() + 5
    while not client.get(f"/v1/rollouts/{r['id']}").json()["step"].startswith("bake"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    a = client.post(f"/v1/rollouts/{r['id']}/abort", json={"reason": "looks off"}, headers=AUTH)
    assert a.status_code == 202 and a.json()["abort_requested"]
    done = wait_done(client, r["id"])
    assert done["status"] == "rolled_back" and "looks off" in done["reason"]
    assert fleet.serving() == {"v1"} and not fleet.held("v2")
    again = client.post(f"/v1/rollouts/{r['id']}/abort", headers=AUTH)
    assert again.status_code == 409
    assert client.post("/v1/rollouts/r-nope/abort", headers=AUTH).status_code == 404
    assert client.get("/v1/rollouts/r-nope").status_code == 404
    metrics = client.get("/metrics").text
    assert 'deploy_rollbacks_total{reason="abort"} 1.0' in metrics
    assert 'deploy_rollout_phase{model="m"} 0.0' in metrics
    assert "deploy_step_duration_seconds_bucket" in metrics


def test_model_rollback_returns_to_the_previous_version(client: TestClient,
                                                        fleet: FakeFleet) -> None:
    assert client.post("/v1/models/m/rollback", headers=AUTH).status_code == 409
    r = client.post("/v1/rollouts", json={"model": "m", "version": "v2", "canary": [100]},
                    headers=AUTH).json()
    assert wait_done(client, r["id"])["status"] == "succeeded"
    back = client.post("/v1/models/m/rollback", json={"reason": "ctr dropped"}, headers=AUTH)
    assert back.status_code == 202, back.text
    b = back.json()
    assert (b["from_version"], b["to_version"], b["canary"]) == ("v2", "v1", [100])
    assert wait_done(client, b["id"])["status"] == "succeeded"
    assert fleet.serving() == {"v1"} and not fleet.held("v2")


def test_restart_recovers_the_interrupted_rollout(controller_config: MakeConfig,
                                                  fleet: FakeFleet) -> None:
    cfg = controller_config()
    with TestClient(build_app(cfg, fleet=fleet)) as c:
        rid = c.post("/v1/rollouts", json={"model": "m", "version": "v2", "bake_s": 60},
                     headers=AUTH).json()["id"]
        deadline = time.monotonic() + 5
        while not c.get(f"/v1/rollouts/{rid}").json()["step"].startswith("bake"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # Shutdown cancelled the bake mid-way; a new process resumes it (bake shortened by
    # a config with max_unsupervised_s large enough to resume).
    with TestClient(build_app(cfg, fleet=fleet)) as c:
        r = c.get(f"/v1/rollouts/{rid}").json()
        assert r["status"] == "running"
        assert [e["event"] for e in r["events"] if e["event"] in ("recover", "resume")] == [
            "recover", "resume"]
        c.post(f"/v1/rollouts/{rid}/abort", headers=AUTH)
        assert wait_done(c, rid)["status"] == "rolled_back"


def test_config_validation_names_the_bad_value(controller_config: MakeConfig) -> None:
    with pytest.raises(ConfigError, match="admin_token_file is required"):
        ControllerConfig().validate()
    with pytest.raises(ConfigError, match="fleet file"):
        controller_config(fleet=None)
    with pytest.raises(ConfigError, match="gate_interval_s must be > 0, got 0"):
        controller_config(gate_interval_s=0)
    with pytest.raises(ConfigError, match="last canary share"):
        controller_config(default_canary=(5, 25))
    with pytest.raises(ConfigError, match="crash_at"):
        controller_config(crash_at="prepare")


def test_command_line_maps_onto_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    from deploy_controller.__main__ import main, parse_args

    monkeypatch.setenv("DEPLOY_CONTROLLER_CRASH_AT", "prepare:end")
    cfg, level = parse_args(["--port", "0", "--journal", str(tmp_path / "j"), "--fleet", "f.yaml",
                             "--default-canary", "10,100", "--gate-max-error-rate", "0.02",
                             "--discovery", "kubernetes", "--k8s-num-shards", "4",
                             "--log-level", "warning"])
    assert (cfg.port, cfg.journal, cfg.fleet, cfg.default_canary) == (
        0, tmp_path / "j", Path("f.yaml"), (10, 100))
    assert cfg.gates.max_error_rate == 0.02 and cfg.gates.min_requests == 20
    assert (cfg.discovery, cfg.k8s_num_shards, cfg.crash_at, level) == (
        "kubernetes", 4, "prepare:end", "warning")
    assert main(["--port", "0"]) == 2  # no token file: refused with a message


@pytest.mark.parametrize(("step", "outcome"), [
    ("unload_old_rankers", "refused"), ("unload_old_shards", "refused"),
    ("rollback_traffic", "noop"), ("unload_new_shards", "noop"), ("bake:1", "abort")])
def test_abort_by_phase(tmp_path: Path, controller_config: MakeConfig, step: str, outcome: str) -> None:
    from deploy_controller.controller import Controller
    from deploy_controller.errors import ControllerError
    from deploy_controller.journal import Journal
    from deploy_controller.state import Kind, Outcome, Step

    journal = Journal(tmp_path / "j.sqlite")
    c = Controller(controller_config(), journal, FakeFleet())
    r = journal.create("m", "v1", "v2", [50, 100], 0)
    journal.end(r.id, Step(Kind.LOAD_DENSE), Outcome.OK, Step.parse(step))
    if outcome == "refused":
        with pytest.raises(ControllerError) as e:
            c.abort(r.id, "x")
        assert e.value.status == 409 and "too late to abort" in e.value.message
    else:
        got = c.abort(r.id, "x")
        assert got.abort_requested is (outcome == "abort")

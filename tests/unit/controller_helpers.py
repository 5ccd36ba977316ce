"""Plain helpers the deploy-controller tests share (their fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from deploy_controller import bluegreen
from deploy_controller.config import ControllerConfig
from deploy_controller.executor import Executor
from deploy_controller.fake import FakeFleet
from deploy_controller.gates import GateConfig
from deploy_controller.journal import Journal, Rollout
from deploy_controller.state import Strategy

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# Gates evaluated every few milliseconds so that a whole rollout runs in well under a second.
FAST = ControllerConfig(default_bake_s=0.0, gate_interval_s=0.005, retry_backoff_s=0.001,
                        gates=GateConfig(min_requests=10, max_score_drift=0.05))


@dataclass
class Harness:
    """An executor over the in-memory fleet and a journal in the test's tmp_path."""

    fleet: FakeFleet
    journal: Journal
    executor: Executor
    cfg: ControllerConfig

    def start(self, canary: list[int] | None = None, bake_s: float = 0.0,
              to: str = "v2") -> Rollout:
        return self.journal.create("m", "v1", to, canary or [50, 100], bake_s)

    def run(self, rollout: Rollout) -> Rollout:
        return asyncio.run(self.executor.run(rollout.id))

    def abort_at(self, point: str) -> None:
        """Request an abort when the journal writes `point` (STEP:begin|end)."""
        def hook(_: str) -> None:
            (r,) = self.journal.active()
            self.journal.request_abort(r.id, "test")
            self.executor.signal_abort(r.id, "test")
        self.executor.cfg = replace(self.executor.cfg, crash_at=point)
        self.executor._crash = hook


# The conftest fixtures' factories: make_harness(crash=None, **cfg), controller_config(**cfg).
MakeHarness = Callable[..., Harness]
MakeConfig = Callable[..., ControllerConfig]


def assert_serving_only(h: Harness, version: str, gone: str) -> None:
    """The fleet serves exactly `version` everywhere and holds `gone` nowhere."""
    assert h.fleet.violations == []
    assert h.fleet.serving() == {version}
    for r in h.fleet.rankers.values():
        assert r.active == version and r.split == {version: 1.0}
        assert r.versions[version] in ("active",)
    for held in h.fleet.shards.values():
        assert held[version].state == "ready"
    assert not h.fleet.held(gone), f"{gone} should be unloaded everywhere"



class _Getter(Protocol):
    def get(self, url: str) -> Any: ...


def wait_done(c: _Getter, rid: str, timeout: float = 10.0, poll_s: float = 0.01) -> dict[str, Any]:
    """Poll the controller's API (httpx or TestClient) until the rollout ends; its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/v1/rollouts/{rid}").json()
        if r["status"] not in ("running", "rolling_back"):
            return dict(r)
        time.sleep(poll_s)
    raise AssertionError(f"rollout {rid} did not end in {timeout} s")


def blue_green_harness(tmp_path: Path, replicas: int = 2, **cfg: Any) -> Harness:
    """A Harness whose fleet routes by version and whose replicas fit one version each."""
    config = replace(FAST, **cfg)
    fleet = FakeFleet(routing=True, budget_bytes=150, replicas=replicas)
    journal = Journal(tmp_path / "journal.sqlite")
    return Harness(fleet, journal, Executor(journal, fleet, config, crash=lambda p: None), config)


def start_blue_green(h: Harness, canary: list[int] | None = None, bake_s: float = 0.0,
                     max_load: float = 2.0) -> Rollout:
    """Journal a blue/green rollout v1 -> v2 with the plan the controller would make."""
    shares = canary or [50, 100]
    p = bluegreen.blue_green(h.fleet.shard_addrs, shares, "v1", "v2", max_load, "test")
    return h.journal.create("m", "v1", "v2", shares, bake_s, Strategy.BLUE_GREEN, p.to_json())


def assert_all_on(h: Harness, version: str, gone: str) -> None:
    """Every ranker serves `version` alone, every replica holds it alone, no breach."""
    assert h.fleet.violations == []
    for r in h.fleet.rankers.values():
        assert (r.active, r.split, set(r.versions)) == (version, {version: 1.0}, {version})
    for addr, held in h.fleet.shards.items():
        assert set(held) == {version} and held[version].state == "ready", (addr, held)
    assert not h.fleet.held(gone)

"""Plain helpers the deploy-controller tests share (their fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from deploy_controller.config import ControllerConfig
from deploy_controller.executor import Executor
from deploy_controller.fake import FakeFleet
from deploy_controller.gates import GateConfig
from deploy_controller.journal import Journal, Rollout

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

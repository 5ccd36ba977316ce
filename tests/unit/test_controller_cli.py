"""deployctl against a real controller (uvicorn on a loopback port) over the fake fleet."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from deploy_controller import cli
from deploy_controller.app import build_app
from deploy_controller.fake import FakeFleet
from tests.unit.controller_helpers import TOKEN, MakeConfig


@dataclass
class Served:
    url: str
    fleet: FakeFleet
    token_file: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path, controller_config: MakeConfig) -> Iterator[Served]:
    fleet = FakeFleet()
    cfg = controller_config()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(cfg, fleet=fleet), host="127.0.0.1",
                                          port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "controller did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", fleet, tmp_path / "token")
    finally:
        server.should_exit = True
        thread.join(10)


def ctl(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def test_options_before_or_after_the_subcommand() -> None:
    p = cli.build_parser()
    a = p.parse_args(["--controller", "http://a:1", "--token-file", "t", "history"])
    b = p.parse_args(["history", "--controller", "http://a:1", "--token-file", "t"])
    assert (a.controller, a.token_file) == (b.controller, b.token_file) == ("http://a:1", Path("t"))
    c = p.parse_args(["--controller", "http://x:1", "status"])
    assert c.controller == "http://x:1", "a subcommand without the option keeps the earlier one"
    r = p.parse_args(["rollout", "m", "v2", "--canary", "5,25,100", "--bake", "3"])
    assert (r.model, r.version, r.canary, r.bake) == ("m", "v2", [5, 25, 100], 3.0)


def test_rollout_follows_progress_and_exits_zero(served: Served) -> None:
    code, out = ctl("rollout", "m", "v2", "--canary", "50,100", "--bake", "0.05", "--poll",
                    "0.01", "--controller", served.url, "--token-file", str(served.token_file))
    assert code == 0, out
    assert "m v1 -> v2" in out and "succeeded" in out
    assert "ranker http://ranker-0" in out and "shard 0" in out
    assert served.fleet.serving() == {"v2"}
    code, out = ctl("--controller", served.url, "history")
    assert code == 0 and "v1 -> v2" in out and "succeeded" in out


def test_rolled_back_rollout_exits_non_zero(served: Served, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setenv("DEPLOYCTL_CONTROLLER", served.url)
    monkeypatch.setenv("DEPLOYCTL_TOKEN", TOKEN)
    served.fleet.fail_load.add(("*", "v2"))
    code, out = ctl("rollout", "m", "v2", "--poll", "0.01")
    assert code == 1
    assert "rolled_back" in out and "reason: load_dense" in out
    assert "422" in out


def test_abort_and_status_by_model(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYCTL_CONTROLLER", served.url)
    code, out = ctl("status")
    assert code == 0 and "no active rollout" in out
    code, _ = ctl("rollout", "m", "v2", "--bake", "30", "--no-wait", "--token-file",
                  str(served.token_file))
    assert code == 0
    code, out = ctl("status", "m")
    assert code == 0 and "m v1 -> v2" in out
    code, _ = ctl("abort", "m", "--reason", "manual test", "--token-file", str(served.token_file))
    assert code == 0
    deadline = time.monotonic() + 10
    while served.fleet.held("v2") or served.fleet.serving() != {"v1"}:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, out = ctl("--json", "history")
    assert code == 0 and '"rolled_back"' in out and "manual test" in out


def test_refusals_and_unreachable_controller(served: Served,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEPLOYCTL_TOKEN", raising=False)
    code, _ = ctl("--controller", served.url, "rollout", "m", "v2")
    assert code == 2  # no token
    code, _ = ctl("--controller", served.url, "--token-file", str(served.token_file),
                  "rollout", "m", "v1")
    assert code == 2  # 409: already active
    code, _ = ctl("--controller", "http://127.0.0.1:9", "history")
    assert code == 2
    code, _ = ctl("--controller", served.url, "--token-file", str(served.token_file),
                  "rollback", "m")
    assert code == 2  # nothing to roll back to


def test_render_shows_gate_and_errors() -> None:
    lines = cli.render({
        "id": "r-1", "model": "m", "from_version": "v1", "to_version": "v2",
        "status": "running", "phase": "stage_embeddings", "step": "bake:0", "reason": "",
        "fleet": {"rankers": {"http://a": {"split": {"v1": 0.95, "v2": 0.05},
                                           "versions": [{"version": "v1", "state": "active"}]},
                              "http://b": {"error": "connection refused"}},
                  "shards": [{"shard": 0, "replicas": {"s:1": {"v1": "ready", "v2": "ready"}}}]},
        "gate": {"ok": False, "failures": ["v2: p99 too high"], "mismatch": 0,
                 "new": {"requests": 40, "errors": 0, "p99_s": 0.02},
                 "old": {"requests": 900, "errors": 0, "p99_s": 0.01}}})
    text = "\n".join(lines)
    assert "traffic v1=95% v2=5%" in text and "connection refused" in text
    assert "s:1 v1:ready v2:ready" in text
    assert "gate FAILING" in text and "p99 20.0 ms (old 10.0 ms)" in text


def test_rollout_plan_prints_the_blue_green_plan_and_starts_nothing(served: Served) -> None:
    served.fleet.routing, served.fleet.budget_bytes = True, 150
    common = ("--controller", served.url, "--token-file", str(served.token_file))
    code, out = ctl("rollout", "m", "v2", "--canary", "50,100", "--plan", *common)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("m v1 -> v2: blue_green (two versions do not fit one replica")
    assert lines[1].startswith("capacity rule: load factor <= 2 (") and lines[1].endswith(": ok")
    row = next(x for x in lines if x.split()[0] == "convert:0")
    assert row.split()[1:] == ["v1=100%", "v1=2x", "v2", "v1", "v2", "v1"]
    code, out = ctl("rollout", "m", "v2", "--strategy", "in-place", "--plan", *common)
    assert code == 2  # refused: 507, two versions do not fit
    assert ctl("history", *common)[1] == ""

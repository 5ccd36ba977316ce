"""Fixtures shared by the unit tests (plain helpers live in controller_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deploy_controller.config import ControllerConfig
from deploy_controller.executor import Executor
from deploy_controller.fake import FakeFleet
from deploy_controller.gates import GateConfig
from deploy_controller.journal import Journal
from tests.unit.controller_helpers import FAST, TOKEN, Harness, MakeConfig, MakeHarness


@pytest.fixture
def controller_config(tmp_path: Path) -> MakeConfig:
    """A validated ControllerConfig factory: token and fleet files in tmp_path, fast gates."""
    def make(**kw: Any) -> ControllerConfig:
        (tmp_path / "token").write_text(TOKEN + "\n")
        (tmp_path / "fleet.json").write_text('{"rankers": [], "embedding_shards": [["x:1"]]}')
        base = ControllerConfig(journal=tmp_path / "journal.sqlite",
                                admin_token_file=tmp_path / "token", fleet=tmp_path / "fleet.json",
                                default_bake_s=0.0, gate_interval_s=0.01, retry_backoff_s=0.001,
                                gates=GateConfig(min_requests=10))
        return replace(base, **kw).validate()
    return make


@pytest.fixture
def make_harness(tmp_path: Path) -> MakeHarness:
    """A Harness factory: make_harness(crash=None, **config overrides of FAST)."""
    def make(crash: Callable[[str], None] | None = None, **cfg: Any) -> Harness:
        config = replace(FAST, **cfg)
        fleet = FakeFleet()
        journal = Journal(tmp_path / "journal.sqlite")
        ex = Executor(journal, fleet, config, crash=crash or (lambda p: None))
        return Harness(fleet, journal, ex, config)
    return make

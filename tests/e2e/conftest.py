"""Session fixtures of the e2e tests: one small demo store for every module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_store import tiny_version
from tests.stack import build_store


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ads_ctr v1 and v2 (small), plus v2bad: v2 with one flipped bit in shard 1's table."""
    return build_store(tmp_path_factory.mktemp("demo_store"))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model, v1 and v2 (tests/helpers_store.py), for in-process apps and one shard."""
    store = tmp_path_factory.mktemp("fuzz_store")
    for v in ("v1", "v2"):
        tiny_version(store, v, seed=int(v[1:]))
    return store

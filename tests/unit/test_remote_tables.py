"""RemoteTables: a shard without the version is version_not_loaded, never the mismatch alarm."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from embedding_server.client import (
    EmbeddingLookupError,
    SeqNotAppliedError,
    VersionMismatchError,
    VersionNotLoadedError,
)
from modelpack.lookup import FINGERPRINT_MISMATCH, SEQ_NOT_APPLIED, VERSION_NOT_LOADED
from ranker_server.errors import RankError
from ranker_server.metrics import Metrics
from ranker_server.remote_tables import RemoteTables
from ranker_server.versions import LoadedVersion

FP = "sha256:" + "ab" * 32
FAILED = grpc.StatusCode.FAILED_PRECONDITION


class FailingClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def lookup(self, *args: Any, **kw: Any) -> list[Any]:
        raise self.error


@pytest.mark.parametrize(("error", "reason"), [
    (VersionNotLoadedError("shard 1: FAILED_PRECONDITION: not loaded", FAILED, 1, VERSION_NOT_LOADED),
     "version_not_loaded"),
    (VersionMismatchError("shard 1: FAILED_PRECONDITION: expects another", FAILED, 1,
                          FINGERPRINT_MISMATCH), "version_mismatch"),
    # An older shard that gives no reason: it may serve another build, so it stays the alarm.
    (EmbeddingLookupError("shard 1: FAILED_PRECONDITION: refused", FAILED, 1), "version_mismatch"),
])
def test_version_failures_map_to_their_own_reasons(error: Exception, reason: str) -> None:
    version = cast(LoadedVersion, SimpleNamespace(
        manifest=SimpleNamespace(model="tiny", version="v1", fingerprint=FP), seq=0))

    async def run() -> RankError:
        remote = RemoteTables([["127.0.0.1:9"]], 1.0)
        await remote.close()
        remote.client = FailingClient(error)  # type: ignore[assignment]
        with pytest.raises(RankError) as e:
            await remote.lookup(version, [], 1.0)
        return e.value

    e = asyncio.run(run())
    assert (e.status, e.reason) == (503, reason)
    assert "tiny/v1" in e.message and str(error) in e.message
    assert e.retry_after_s == (1 if reason == "version_not_loaded" else None)


def test_each_version_failure_has_its_own_counter() -> None:
    m = Metrics()
    for reason in ("version_not_loaded", "version_not_loaded", "version_mismatch", "deadline"):
        m.count_failed_request(reason)
    assert m.registry.get_sample_value("ranker_version_not_loaded_total") == 2
    assert m.registry.get_sample_value("ranker_version_mismatch_total") == 1


def test_no_replica_at_the_seq_is_503_seq_not_applied_and_counted() -> None:
    """seq_not_applied names the seq and is retried later (503), never served otherwise;
    every replica's refusal counts in ranker_seq_not_applied_total{shard}."""
    version = cast(LoadedVersion, SimpleNamespace(
        manifest=SimpleNamespace(model="tiny", version="v1", fingerprint=FP), seq=4))
    error = SeqNotAppliedError("shard 1: FAILED_PRECONDITION: not readable", FAILED, 1,
                               SEQ_NOT_APPLIED)
    metrics = Metrics()

    async def run() -> RankError:
        remote = RemoteTables([["127.0.0.1:9"]], 1.0, metrics=metrics)
        await remote.close()
        hook = remote.client.on_seq_not_applied  # what the client calls per refusal
        assert hook is not None
        hook(1)
        remote.client = FailingClient(error)  # type: ignore[assignment]
        with pytest.raises(RankError) as e:
            await remote.lookup(version, [], 1.0)
        return e.value

    e = asyncio.run(run())
    assert (e.status, e.reason, e.retry_after_s) == (503, "seq_not_applied", 1)
    assert "tiny/v1 at delta seq 4" in e.message and "shard 1" in e.message
    assert metrics.registry.get_sample_value("ranker_seq_not_applied_total", {"shard": "1"}) == 1

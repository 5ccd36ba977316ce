"""RemoteTables: a shard without the version is version_not_loaded, never the mismatch alarm;
no replica holding it is no_replica_holds_version; the prepare rule (every replica, or
`min_replicas` per shard)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from embedding_server.client import (
    EmbeddingLookupError,
    NoReplicaHoldsVersionError,
    SeqNotAppliedError,
    VersionMismatchError,
    VersionNotLoadedError,
)
from embedding_server.routing import NO_REPLICA_HOLDS_VERSION
from modelpack.lookup import FINGERPRINT_MISMATCH, SEQ_NOT_APPLIED, VERSION_NOT_LOADED
from modelpack.manifest import Manifest
from protos import embedding_pb2 as epb
from ranker_server.errors import RankError
from ranker_server.metrics import Metrics
from ranker_server.remote_tables import RemoteTables
from ranker_server.sources import PrepareError
from ranker_server.versions import LoadedVersion

FP = "sha256:" + "ab" * 32
FAILED = grpc.StatusCode.FAILED_PRECONDITION
READY, LOADING = epb.VERSION_STATE_READY, epb.VERSION_STATE_LOADING


class FailingClient:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def lookup(self, *args: Any, **kw: Any) -> list[Any]:
        raise self.error


def _refusal(error: Exception, *, version: str = "v1", seq: int = 0,
             metrics: Metrics | None = None,
             before: Callable[[RemoteTables], None] | None = None) -> RankError:
    """The RankError RemoteTables.lookup raises when its client fails with `error`."""
    pinned = cast(LoadedVersion, SimpleNamespace(
        manifest=SimpleNamespace(model="tiny", version=version, fingerprint=FP), seq=seq))

    async def run() -> RankError:
        remote = RemoteTables([["127.0.0.1:9"]], 1.0, metrics=metrics)
        await remote.close()
        if before is not None:
            before(remote)
        remote.client = FailingClient(error)  # type: ignore[assignment]
        with pytest.raises(RankError) as e:
            await remote.lookup(pinned, [], 1.0)
        return e.value

    return asyncio.run(run())


@pytest.mark.parametrize(("error", "reason"), [
    (VersionNotLoadedError("shard 1: FAILED_PRECONDITION: not loaded", FAILED, 1, VERSION_NOT_LOADED),
     "version_not_loaded"),
    (VersionMismatchError("shard 1: FAILED_PRECONDITION: expects another", FAILED, 1,
                          FINGERPRINT_MISMATCH), "version_mismatch"),
    # An older shard that gives no reason: it may serve another build, so it stays the alarm.
    (EmbeddingLookupError("shard 1: FAILED_PRECONDITION: refused", FAILED, 1), "version_mismatch"),
])
def test_version_failures_map_to_their_own_reasons(error: Exception, reason: str) -> None:
    e = _refusal(error)
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
    error = SeqNotAppliedError("shard 1: FAILED_PRECONDITION: not readable", FAILED, 1,
                               SEQ_NOT_APPLIED)
    metrics = Metrics()

    def refused_once(remote: RemoteTables) -> None:
        hook = remote.client.on_seq_not_applied  # what the client calls per refusal
        assert hook is not None
        hook(1)

    e = _refusal(error, seq=4, metrics=metrics, before=refused_once)
    assert (e.status, e.reason, e.retry_after_s) == (503, "seq_not_applied", 1)
    assert "tiny/v1 at delta seq 4" in e.message and "shard 1" in e.message
    assert metrics.registry.get_sample_value("ranker_seq_not_applied_total", {"shard": "1"}) == 1


def test_no_holder_is_503_no_replica_holds_version_and_counted() -> None:
    """The routing table's fast refusal: its own reason and counter, not version_not_loaded
    (whose counter the rollout gates read), Retry-After, shard and version named."""
    error = NoReplicaHoldsVersionError("shard 1: no replica holds tiny/v2 READY", FAILED, 1,
                                       NO_REPLICA_HOLDS_VERSION)
    metrics = Metrics()
    e = _refusal(error, version="v2", metrics=metrics)
    assert (e.status, e.reason, e.retry_after_s) == (503, NO_REPLICA_HOLDS_VERSION, 1)
    assert "shard 1" in e.message and "tiny/v2" in e.message
    sample = metrics.registry.get_sample_value
    assert sample("ranker_no_replica_holds_version_total", {"shard": "1", "version": "v2"}) == 1
    metrics.count_failed_request(e.reason)
    assert not sample("ranker_version_not_loaded_total")


def _listing(shard: int, fingerprint: str | None, state: int = READY) -> epb.ListVersionsResponse:
    """Replica of `shard` (of 2) holding tiny/v0, and tiny/v1 unless `fingerprint` is None."""
    infos = [epb.VersionInfo(model="tiny", version="v0", fingerprint="sha256:old", state=READY)]
    if fingerprint is not None:
        infos.append(epb.VersionInfo(model="tiny", version="v1", fingerprint=fingerprint,
                                     state=cast(Any, state)))
    return epb.ListVersionsResponse(versions=infos, shard=shard, num_shards=2)


DOWN = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                            "connection refused")


class ListingClient:
    """Every replica's ListVersions answer (or error), as EmbeddingClient.list_versions."""

    def __init__(self, answers: list[list[Any]]) -> None:
        self.answers = answers
        self.replicas = [["10.0.0.1:1", "10.0.0.2:1"], ["10.0.0.3:1", "10.0.0.4:1"]]

    async def list_versions(self, timeout_s: float = 2.0) -> list[list[Any]]:
        return self.answers


@pytest.mark.parametrize(("second", "need", "error"), [
    # shard 1's second replica: holds v1 / not / loading / down / another build
    (_listing(1, FP), 0, None),
    (_listing(1, FP), 1, None),
    (_listing(1, None), 0, "shard 1 replica 10.0.0.4:1 does not hold tiny/v1"),
    (_listing(1, None), 1, None),  # blue/green: one replica per shard is enough
    (_listing(1, None), 2, "(1 of shard 0's replicas hold it, 2 needed)"),
    (_listing(1, FP, LOADING), 0, "holds tiny/v1 in state 1 (not READY)"),
    (_listing(1, FP, LOADING), 1, None),
    (DOWN, 0, "10.0.0.4:1 did not answer ListVersions: UNAVAILABLE"),
    (DOWN, 1, None),
    (_listing(1, "sha256:other"), 1, "10.0.0.4:1 serves tiny/v1 with fingerprint sha256:other"),
    (_listing(0, None), 1, "says it is shard 0 of 2, the ranker expects shard 1"),
])
def test_prepare_every_replica_or_enough_per_shard(second: Any, need: int,
                                                   error: str | None) -> None:
    manifest = cast(Manifest, SimpleNamespace(model="tiny", version="v1", fingerprint=FP))
    answers = [[_listing(0, FP), _listing(0, None)], [_listing(1, FP), second]]

    async def run() -> None:
        remote = RemoteTables([["127.0.0.1:9"]], 1.0, prepare_min_replicas=need)
        await remote.close()
        remote.client = ListingClient(answers)  # type: ignore[assignment]
        if need == 0:  # shard 0's second replica lacks v1: "every replica" refuses at once
            with pytest.raises(PrepareError, match=r"shard 0 replica 10\.0\.0\.2:1 does not hold"):
                await remote.prepare(manifest)
            answers[0][1] = _listing(0, FP)
            if error is None:
                await remote.prepare(manifest)
        if error is None:
            await remote.prepare(manifest)
            return
        with pytest.raises(PrepareError) as e:
            await remote.prepare(manifest)
        assert error in str(e.value)

    asyncio.run(run())


def test_prepare_min_replicas_per_call_overrides_the_default() -> None:
    manifest = cast(Manifest, SimpleNamespace(model="tiny", version="v1", fingerprint=FP))

    async def run() -> None:
        remote = RemoteTables([["127.0.0.1:9"]], 1.0)
        await remote.close()
        remote.client = ListingClient(  # type: ignore[assignment]
            [[_listing(0, FP), _listing(0, None)], [_listing(1, None), _listing(1, FP)]])
        with pytest.raises(PrepareError, match="does not hold"):
            await remote.prepare(manifest)
        await remote.prepare(manifest, min_replicas=1)

    asyncio.run(run())

"""Pipeline order (dense staging overlaps the lookups), and shard answers mapped to statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest

from embedding_server.client import EmbeddingLookupError, VersionMismatchError
from modelpack.lookup import Packed, TableQuery
from modelpack.manifest import Manifest
from modelpack.requests import decode_request
from modelpack.scorer import OfflineScorer, TableReader
from protos import embedding_pb2 as epb
from ranker_server.device import Device
from ranker_server.errors import RankError
from ranker_server.metrics import Metrics
from ranker_server.pipeline import Pipeline
from ranker_server.remote_tables import RemoteTables
from ranker_server.sources import PrepareError
from ranker_server.versions import LoadedVersion
from tests.helpers_store import TINY_SCHEMA, loaded_tiny_version, tiny_request

T = TypeVar("T")


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> LoadedVersion:
    return loaded_tiny_version(tmp_path_factory.mktemp("store"))


class SlowTables:
    """Local file rows, answered after `delay_s`; records when the answer came."""

    def __init__(self, version: LoadedVersion, delay_s: float) -> None:
        self.readers = {t.name: TableReader(version.path, t) for t in version.manifest.tables}
        self.delay_s = delay_s
        self.answered_at = 0.0

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> list[Packed]:
        await asyncio.sleep(self.delay_s)
        self.answered_at = time.monotonic()
        return [self.readers[q.table].gather(q.rows) for q in queries]


class RecordingDevice(Device):
    staged_at = 0.0  # when the dense inputs went to the staging thread (its first task)

    async def stage(self, fn: Callable[..., T], *args: object) -> T:
        self.staged_at = self.staged_at or time.monotonic()
        return await super().stage(fn, *args)


@pytest.mark.parametrize("serial", [False, True])
def test_dense_inputs_are_staged_while_lookups_fly(version: LoadedVersion, serial: bool) -> None:
    reqs = [decode_request(TINY_SCHEMA, tiny_request(3 + i, seed=i)) for i in range(4)]
    scorer = OfflineScorer(version.path)

    async def run() -> None:
        device = RecordingDevice("cpu")
        source = SlowTables(version, delay_s=0.05)
        pipeline = Pipeline(device, source, Metrics(), serial_lookups=serial)  # type: ignore[arg-type]
        scores = await pipeline.run(version, reqs, timeout_s=1.0)
        device.close()
        assert (device.staged_at >= source.answered_at) == serial
        for r, s in zip(reqs, scores, strict=True):
            np.testing.assert_allclose(s, scorer.score_decoded(r), atol=2e-6, rtol=0)

    asyncio.run(run())


class FakeClient:
    def __init__(self, error: Exception | None = None,
                 answers: list[list[epb.ListVersionsResponse]] | None = None) -> None:
        self.error = error
        self.answers = answers or []
        self.replicas = [["10.0.0.1:1", "10.0.0.2:1"], ["10.0.0.3:1"]]

    async def lookup(self, *args: Any, **kw: Any) -> list[Packed]:
        assert self.error is not None
        raise self.error

    async def list_versions(self, timeout_s: float = 2.0) -> list[list[epb.ListVersionsResponse]]:
        return self.answers


def _remote(client: FakeClient) -> RemoteTables:
    rt = RemoteTables([["127.0.0.1:9"]], prepare_timeout_s=1.0)
    rt.client = client  # type: ignore[assignment]
    return rt


@pytest.mark.parametrize("error, status, reason", [
    (VersionMismatchError("shard 1 answered tiny/v2 (sha256:x) for a lookup of tiny/v1"), 503,
     "version_mismatch"),
    (EmbeddingLookupError("shard 1: fingerprint differs", grpc.StatusCode.FAILED_PRECONDITION, 1),
     503, "version_mismatch"),
    (EmbeddingLookupError("late", grpc.StatusCode.DEADLINE_EXCEEDED, 0), 504, "deadline"),
    (EmbeddingLookupError("down", grpc.StatusCode.UNAVAILABLE, 0), 503, "embedding_unavailable"),
    (EmbeddingLookupError("full", grpc.StatusCode.RESOURCE_EXHAUSTED, 0), 503,
     "embedding_unavailable"),
    (EmbeddingLookupError("bug", grpc.StatusCode.INVALID_ARGUMENT, 0), 502, "embedding_error"),
])
def test_lookup_failures_map_to_statuses(version: LoadedVersion, error: Exception, status: int,
                                         reason: str) -> None:
    async def run() -> None:
        with pytest.raises(RankError) as e:
            await _remote(FakeClient(error)).lookup(version, [], 1.0)
        assert (e.value.status, e.value.reason) == (status, reason)
        if reason == "version_mismatch":  # names the pinned version and what the shard said
            assert "tiny/v1" in e.value.message and version.fingerprint in e.value.message
            assert str(error) in e.value.message

    asyncio.run(run())


def _answer(m: Manifest, shard: int, *, fingerprint: str | None = None,
            state: Any = epb.VERSION_STATE_READY, held: bool = True) -> epb.ListVersionsResponse:
    infos = [epb.VersionInfo(model="tiny", version="v0", fingerprint="sha256:old",
                             state=epb.VERSION_STATE_READY)]
    if held:
        infos.append(epb.VersionInfo(model="tiny", version="v1", state=state,
                                     fingerprint=fingerprint or m.fingerprint))
    return epb.ListVersionsResponse(versions=infos, shard=shard, num_shards=2)


@pytest.mark.parametrize("bad, message", [
    (None, None),
    (lambda m: _answer(m, 0), "says it is shard 0 of 2, the ranker expects shard 1"),
    (lambda m: _answer(m, 1, held=False), "does not hold tiny/v1 (it holds: tiny/v0)"),
    (lambda m: _answer(m, 1, state=epb.VERSION_STATE_LOADING), "not READY"),
    (lambda m: _answer(m, 1, fingerprint="sha256:other"), "fingerprint sha256:other"),
])
def test_prepare_handshake_names_the_replica(version: LoadedVersion, bad: Any,
                                             message: str | None) -> None:
    m = version.manifest
    last = bad(m) if bad else _answer(m, 1)
    client = FakeClient(answers=[[_answer(m, 0), _answer(m, 0)], [last]])

    async def run() -> None:
        rt = _remote(client)
        if message is None:
            await rt.prepare(m)
            return
        with pytest.raises(PrepareError) as e:
            await rt.prepare(m)
        assert str(e.value).startswith("shard 1 replica 10.0.0.3:1") and message in str(e.value)

    asyncio.run(run())


"""The routing table (embedding_server.routing): what each replica holds READY, the choice
for (version, fingerprint, seq), refresh (periodic, after a refusal, before failing on its
word), and the shards it leaves to gRPC. ListVersions answers come from a fake fetch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from embedding_server.routing import (
    EVERY_REPLICA,
    MIN_REFRESH_INTERVAL_S,
    Choice,
    RoutingTable,
)
from protos import embedding_pb2 as pb

FP1, FP2, OTHER = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "9" * 64
READY, UNLOADING = pb.VERSION_STATE_READY, pb.VERSION_STATE_UNLOADING
SHARDS = [["10.0.0.1:1", "10.0.0.2:1"], ["10.0.0.3:1", "10.0.0.4:1"]]


def answer(*held: tuple[str, str, pb.VersionState, list[int]]
           ) -> pb.ListVersionsResponse:
    """A ListVersions answer holding (version, fingerprint, state, readable seqs)."""
    return pb.ListVersionsResponse(versions=[
        pb.VersionInfo(model="m", version=v, fingerprint=fp, state=st, readable_seqs=seqs)
        for v, fp, st, seqs in held])


class Fleet:
    """What every replica answers to ListVersions now, and how often it was asked."""

    def __init__(self) -> None:
        both = answer(("v1", FP1, READY, [0, 1]), ("v2", FP2, READY, [0]))
        only_v2 = answer(("v2", FP2, READY, [0]))
        self.answers: dict[tuple[int, int], pb.ListVersionsResponse | Exception] = {
            (0, 0): both, (0, 1): only_v2, (1, 0): both, (1, 1): only_v2}
        self.calls = 0

    async def fetch(self, k: int, r: int, timeout_s: float) -> pb.ListVersionsResponse:
        self.calls += 1
        await asyncio.sleep(0)
        a = self.answers[k, r]
        if isinstance(a, Exception):
            raise a
        return a


def table(fleet: Fleet, shards: list[list[str]] = SHARDS, refresh_s: float = 1.0
          ) -> RoutingTable:
    return RoutingTable(shards, fleet.fetch, refresh_s)


def test_unknown_replicas_may_be_asked_anything_until_they_answer() -> None:
    t = table(Fleet())
    assert t.choose(0, ("m", "v9", FP1, 7)) == EVERY_REPLICA  # nothing known: as without a table


def test_choice_by_version_fingerprint_and_seq() -> None:
    async def main() -> RoutingTable:
        t = table(Fleet())
        await t.refresh()
        return t

    t = asyncio.run(main())
    assert t.choose(0, ("m", "v1", FP1, 0)) == Choice(frozenset({0}), 1)
    assert t.choose(1, ("m", "v1", FP1, 1)) == Choice(frozenset({0}), 1)
    assert t.choose(0, ("m", "v2", FP2, 0)) == EVERY_REPLICA  # both hold it: the common case
    assert t.choose(0, ("m", "v2", "", 0)) == EVERY_REPLICA  # no fingerprint named: any build
    assert t.choose(0, ("m", "v1", FP1, 2)) == Choice(frozenset(), 1)  # held, seq 2 unreadable
    assert t.choose(0, ("m", "v3", FP1, 0)) == Choice(frozenset(), 0)  # held by none
    other = t.choose(0, ("m", "v1", OTHER, 0))  # another build: named, never chosen
    assert other.replicas == frozenset() and other.holders == 0
    assert other.other_builds == (f"10.0.0.1:1 ({FP1})",)
    assert t.choose(0, ("x", "v1", FP1, 0)).replicas == frozenset()  # another model
    assert "10.0.0.2:1: v2 READY" in t.describe(0, "m")


def test_only_ready_versions_count_a_change_is_seen_and_silence_keeps_the_last_word(
        ) -> None:
    fleet = Fleet()

    async def main() -> None:
        t = table(fleet)
        await t.refresh()
        assert t.choose(0, ("m", "v1", FP1, 0)).replicas == frozenset({0})
        fleet.answers[0, 0] = answer(("v1", FP1, UNLOADING, [0]), ("v2", FP2, READY, [0]))
        fleet.answers[0, 1] = answer(("v1", FP1, READY, []), ("v2", FP2, READY, [0]))
        await t.refresh()
        # r0 unloading no longer holds it; r1 lists no seqs: it may be asked any.
        assert t.choose(0, ("m", "v1", FP1, 5)).replicas == frozenset({1})
        fleet.answers[0, 1] = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE,
                                                   grpc.aio.Metadata(), grpc.aio.Metadata())
        await t.refresh()  # r1 down: what it said last stands (UNAVAILABLE fails it over)
        assert t.choose(0, ("m", "v1", FP1, 5)).replicas == frozenset({1})

    asyncio.run(main())


def test_dns_targets_and_single_replicas_are_not_routed() -> None:
    fleet = Fleet()

    async def main() -> RoutingTable:
        t = table(fleet, [["dns:///shard-0.svc:50051"], ["10.0.0.3:1"]])
        await t.refresh()
        return t

    t = asyncio.run(main())
    assert fleet.calls == 0 and not t.routed(0) and not t.routed(1)
    assert t.choose(0, ("m", "v3", FP1, 0)) == EVERY_REPLICA


def test_periodic_refresh_and_close() -> None:
    fleet = Fleet()

    async def main() -> None:
        t = table(fleet, refresh_s=0.02)
        t.start()
        t.start()  # idempotent
        await asyncio.sleep(0.15)
        assert fleet.calls >= 4 * 3  # every replica, several rounds
        await t.close()
        calls = fleet.calls
        await asyncio.sleep(0.05)
        assert fleet.calls == calls

    asyncio.run(main())


def test_refreshes_on_refusal_are_rate_limited_and_shared() -> None:
    fleet = Fleet()

    async def main() -> None:
        t = table(fleet)
        for _ in range(20):  # a burst of refusals: one round
            t.refresh_soon()
        await asyncio.sleep(0.01)
        assert fleet.calls == 4
        # Lookups finding no holder at once: they join one round, not one each.
        await asyncio.sleep(MIN_REFRESH_INTERVAL_S)
        await asyncio.gather(*(t.ensure_fresh(1.0) for _ in range(10)))
        assert fleet.calls == 8
        await t.ensure_fresh(1.0)  # a round a moment ago: trusted
        assert fleet.calls == 8
        await asyncio.sleep(MIN_REFRESH_INTERVAL_S)
        t.refresh_soon()
        await asyncio.sleep(0.01)
        assert fleet.calls == 12

    asyncio.run(main())


@pytest.mark.parametrize("refused", [0, 1])
def test_choice_cache_follows_the_answers(refused: int) -> None:
    fleet = Fleet()

    async def main() -> None:
        t = table(fleet)
        await t.refresh()
        assert t.choose(1, ("m", "v1", FP1, 0)).replicas == frozenset({0})
        fleet.answers[1, 1] = answer(("v1", FP1, READY, [0]))
        fleet.answers[1, 0] = answer() if refused else fleet.answers[1, 0]
        await t.refresh()
        want = frozenset({1}) if refused else None
        assert t.choose(1, ("m", "v1", FP1, 0)).replicas == want

    asyncio.run(main())

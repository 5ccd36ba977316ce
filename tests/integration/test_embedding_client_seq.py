"""The client and delta seqs: every answer's seq is checked, a replica that cannot read the
seq is failed over to a sibling, and a shard none of whose replicas can read it fails
SeqNotAppliedError, on both transports. The shard replicas are real gRPC servers on real
ports that answer like a shard holding certain seqs (the protocol only: rows are zeros).
They do not implement ListVersions, so the client's routing table never hears from them
and routes as without one (like a dns:/// shard): these are the failover rule's own tests
(test_embedding_client_routing.py: the same fleet state routed around)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from embedding_server.client import EmbeddingClient, SeqNotAppliedError, VersionMismatchError
from modelpack.lookup import REASON_METADATA, SEQ_NOT_APPLIED, TableQuery
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

FP = "sha256:" + "cd" * 32
ROWS, DIM, ROW_BYTES = 100, 16, 12
TRANSPORTS = ["stream", "unary"]


class _SeqReplica(pbg.EmbeddingServiceServicer):
    """One replica of a one-shard model tiny/v1 that can read `readable` seqs; answers
    echo the requested seq plus `echo_offset` (nonzero: a buggy shard)."""

    def __init__(self, readable: set[int], echo_offset: int = 0) -> None:
        self.readable, self.echo_offset = readable, echo_offset
        self.asked: list[int] = []  # the seq of every lookup it got

    def _answer(self, r: pb.LookupRequest) -> pb.LookupResponse | str:
        self.asked.append(r.seq)
        if r.seq not in self.readable:
            return f"tiny/v1 at delta seq {r.seq} is not readable here (readable: {self.readable})"
        n = len(r.tables[0].rows) // 8
        return pb.LookupResponse(
            model=r.model, version=r.version, fingerprint=FP, shard=0, num_shards=1, id=r.id,
            seq=r.seq + self.echo_offset,
            results=[pb.TableResult(table="unified", dim=DIM, count=n, data=bytes(n * ROW_BYTES))])

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext
               ) -> pb.LookupResponse:
        out = self._answer(request)
        if isinstance(out, str):
            context.set_trailing_metadata(((REASON_METADATA, SEQ_NOT_APPLIED),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, out)
        assert not isinstance(out, str)
        return out

    def LookupStream(self, requests: Iterator[pb.LookupRequest], context: grpc.ServicerContext
                     ) -> Iterator[pb.LookupResponse]:
        for r in requests:
            out = self._answer(r)
            if isinstance(out, str):
                out = pb.LookupResponse(id=r.id, failure=pb.LookupFailure(
                    code=grpc.StatusCode.FAILED_PRECONDITION.value[0], reason=SEQ_NOT_APPLIED,
                    message=out))
            yield out


@pytest.fixture
def replicas() -> Iterator[list[tuple[str, _SeqReplica]]]:
    """Two replicas of the one shard: `a` reads seqs {0}, `b` reads {0, 1}."""
    started = []
    for readable in ({0}, {0, 1}):
        servicer = _SeqReplica(readable)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pbg.add_EmbeddingServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, f"127.0.0.1:{port}", servicer))
    yield [(addr, s) for _, addr, s in started]
    for server, _, _ in started:
        server.stop(0).wait()


def _lookups(addresses: list[str], transport: str, seq: int, n: int) -> tuple[list[int], int]:
    """n lookups at `seq`, one after the other: (each answer's row count, refusals counted)."""
    refusals: list[int] = []
    q = TableQuery("unified", ROWS, DIM, np.arange(0, ROWS, 7, dtype=np.int64))

    async def main() -> list[int]:
        c = EmbeddingClient([addresses], default_timeout_s=5.0, transport=transport,
                            on_seq_not_applied=refusals.append)
        try:
            return [(await c.lookup("tiny", "v1", FP, [q], seq=seq))[0].shape[0]
                    for _ in range(n)]
        finally:
            await c.close()

    return asyncio.run(main()), len(refusals)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_replica_without_the_seq_is_failed_over(
        replicas: list[tuple[str, _SeqReplica]], transport: str) -> None:
    (a_addr, a), (b_addr, b) = replicas
    sizes, refusals = _lookups([a_addr, b_addr], transport, seq=1, n=12)
    assert sizes == [15] * 12  # every lookup answered, by b
    assert b.asked.count(1) == 12 and 1 in a.asked  # a was asked (round robin) and refused
    assert refusals == a.asked.count(1)  # each refusal counted once


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_replica_with_the_seq_fails_seq_not_applied(
        replicas: list[tuple[str, _SeqReplica]], transport: str) -> None:
    (a_addr, _), (b_addr, _) = replicas
    with pytest.raises(SeqNotAppliedError) as e:
        _lookups([a_addr, b_addr], transport, seq=2, n=1)
    assert e.value.shard == 0 and e.value.reason == SEQ_NOT_APPLIED
    assert "delta seq 2" in str(e.value)


def test_the_one_replica_left_cannot_read_it_while_the_other_is_down(
        replicas: list[tuple[str, _SeqReplica]]) -> None:
    """seq_not_applied, not embedding_unavailable: the shard answered why it cannot."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refuses at once
        with pytest.raises(SeqNotAppliedError, match="delta seq 1"):
            _lookups([replicas[0][0], dead], "stream", seq=1, n=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_answer_at_another_seq_is_a_mismatch(
        replicas: list[tuple[str, _SeqReplica]], transport: str) -> None:
    b_addr, b = replicas[1]
    b.echo_offset = -1  # rows of seq 0 for a read at seq 1
    with pytest.raises(VersionMismatchError, match="read at delta seq 0 for a lookup at seq 1"):
        _lookups([b_addr], transport, seq=1, n=1)

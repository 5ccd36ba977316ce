"""LookupStream on real servers: the unary path's answers and checks, per message, by id."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import cast

import numpy as np

from modelpack.hashing import shard_range
from modelpack.int4 import dequantize_rows
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.integration.embedding_server.fleet import (
    CATS,
    DIM,
    ROWS,
    C,
    StreamClient,
    close,
    file_rows,
    fingerprint,
    group,
    values,
)
from tests.integration.embedding_server.test_lookups import BAD_REQUESTS, reason_of

OUTPUTS = (pb.OUTPUT_INT4_PACKED, pb.OUTPUT_FP16, pb.OUTPUT_FP32)


def _request(rid: int, *groups: pb.TableLookup, **fields: object) -> pb.LookupRequest:
    return pb.LookupRequest(**{"model": "tiny", "version": "v1", "id": rid, "tables": list(groups),
                               **fields})  # type: ignore[arg-type]


def _check(store: Path, resp: pb.LookupResponse, shard: int, table: str, ids: np.ndarray,
           output: pb.Output, pooling: pb.Pooling, offsets: list[int] | None) -> None:
    assert not resp.HasField("failure"), resp.failure
    assert (resp.model, resp.version, resp.fingerprint) == ("tiny", "v1", fingerprint(store, "v1"))
    assert (resp.shard, resp.num_shards) == (shard, 2)
    (res,) = resp.results
    packed = file_rows(store, "v1", table, ids)
    if output == pb.OUTPUT_INT4_PACKED:
        assert res.data == packed.tobytes() and res.count == ids.size
        return
    vals = dequantize_rows(packed, DIM).astype(np.float64)
    if pooling != pb.POOLING_NONE:
        bags = [vals[a:b] for a, b in itertools.pairwise(offsets)]  # type: ignore[arg-type]
        pool = np.sum if pooling == pb.POOLING_SUM else np.mean
        vals = np.stack([pool(b, axis=0) if len(b) else np.zeros(DIM) for b in bags])
    assert res.dim == DIM and close(values(res, output), vals, output)


def test_stream_answers_equal_the_file_rows_for_every_output(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    """Both shards at once, every lookup sent before any answer is read, matched by id."""
    rng = np.random.default_rng(11)
    fp = fingerprint(store, "v1")
    for shard in (0, 1):
        stream = StreamClient(stubs[f"s{shard}"])
        lo, hi = shard_range(shard, ROWS, 2)
        c_lo, c_hi = shard_range(shard, CATS, 2)
        cases: list[tuple[str, np.ndarray, pb.Output, pb.Pooling, list[int] | None]] = []
        for table, (a, b) in (("unified", (lo, hi)), ("cats", (c_lo, c_hi))):
            ids = rng.integers(a, b, 9)
            cases += [(table, ids, o, pb.POOLING_NONE, None) for o in OUTPUTS]
            cases += [(table, ids, o, p, [0, 4, 4, 9]) for o in OUTPUTS[1:]
                      for p in (pb.POOLING_SUM, pb.POOLING_MEAN)]
        for i, (table, ids, out, pool, off) in enumerate(cases):
            stream.send(_request(1000 + i, group(table, ids, out, pool, off),
                                 fingerprint=fp if i % 2 else ""))
        answers = stream.answers(len(cases))
        for i, case in enumerate(cases):
            _check(store, answers[1000 + i], shard, *case)
        stream.close()
        assert list(stream.call) == [] and stream.call.code() == C.OK


def test_each_bad_lookup_gets_its_failure_and_the_stream_goes_on(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    """Every unary bad-request case, on one stream between good lookups: the same code and
    message as unary, the reason (version_not_loaded vs fingerprint_mismatch apart)."""
    stream = StreamClient(stubs["s0"])
    good = np.array([3, 1, 499])
    for i, (_case, fields, _code, _message) in enumerate(BAD_REQUESTS):
        stream.send(_request(2 * i + 1, **cast(dict[str, object], fields)))
        stream.send(_request(2 * i + 2, group("unified", good)))
    answers = stream.answers(2 * len(BAD_REQUESTS))
    for i, (case, _fields, code, message) in enumerate(BAD_REQUESTS):
        bad, ok = answers[2 * i + 1], answers[2 * i + 2]
        assert bad.HasField("failure") and not bad.results and not bad.version, case
        assert (bad.failure.code, bad.failure.reason) == (code.value[0], reason_of(case)), case
        assert re.search(message, bad.failure.message), (case, bad.failure.message)
        _check(store, ok, 0, "unified", good, pb.OUTPUT_INT4_PACKED, pb.POOLING_NONE, None)
    stream.close()
    assert list(stream.call) == [] and stream.call.code() == C.OK


def test_per_lookup_deadline_on_a_stream(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    """timeout_s bounds one lookup (deadline_exceeded); the stream serves the next one."""
    big = group("unified", np.zeros(2_000_000, np.int64), pb.OUTPUT_FP32)
    stream = StreamClient(stubs["r0"])
    stream.send(_request(1, big, big, timeout_s=0.02))
    stream.send(_request(2, group("cats", [1])))
    answers = stream.answers(2)
    assert (answers[1].failure.code, answers[1].failure.reason) == (C.DEADLINE_EXCEEDED.value[0],
                                                                    "deadline_exceeded")
    assert answers[2].results[0].count == 1
    stream.close()
    assert list(stream.call) == [] and stream.call.code() == C.OK

"""Lookups and their status codes, on real servers (fixtures: conftest.py)."""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelpack.hashing import shard_of, shard_range
from modelpack.int4 import dequantize_rows
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.integration.embedding_server.fleet import (
    CATS,
    DIM,
    ROW_BYTES,
    ROWS,
    C,
    close,
    file_rows,
    fingerprint,
    group,
    lookup,
    values,
)

# ------------------------------------------------------------------------- lookups


@pytest.mark.parametrize("shard", [0, 1])
def test_every_output_equals_numpy_dequantization_of_the_files(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub], shard: int) -> None:
    rng = np.random.default_rng(shard)
    lo, hi = shard_range(shard, ROWS, 2)
    c_lo, c_hi = shard_range(shard, CATS, 2)
    rows, cats = rng.integers(lo, hi, 300), rng.integers(c_lo, c_hi, 40)
    outputs = (pb.OUTPUT_INT4_PACKED, pb.OUTPUT_FP16, pb.OUTPUT_FP32)
    resp = lookup(stubs[f"s{shard}"], *[group("unified", rows, o) for o in outputs],
                  *[group("cats", cats, o) for o in outputs], fingerprint=fingerprint(store, "v1"))
    assert (resp.model, resp.version, resp.fingerprint) == ("tiny", "v1", fingerprint(store, "v1"))
    assert (resp.shard, resp.num_shards) == (shard, 2)
    assert [r.table for r in resp.results] == ["unified"] * 3 + ["cats"] * 3
    for res, ids in zip(resp.results, [rows] * 3 + [cats] * 3, strict=True):
        assert res.dim == DIM and res.count == ids.size
    for i, (table, ids) in enumerate((("unified", rows), ("cats", cats))):
        packed = file_rows(store, "v1", table, ids)
        assert resp.results[3 * i].data == packed.tobytes()
        for j, out in ((1, pb.OUTPUT_FP16), (2, pb.OUTPUT_FP32)):
            assert close(values(resp.results[3 * i + j], out), dequantize_rows(packed, DIM), out)


@pytest.mark.parametrize("output", [pb.OUTPUT_FP16, pb.OUTPUT_FP32])
@pytest.mark.parametrize("pooling", [pb.POOLING_SUM, pb.POOLING_MEAN])
def test_pooled_bags_including_empty_ones(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub],
                                          pooling: pb.Pooling, output: pb.Output) -> None:
    rng = np.random.default_rng(7)
    lengths = np.array([0, 3, 1, 0, 20, 5, 0])
    rows = rng.integers(500, 1000, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    res = lookup(stubs["s1"], group("unified", rows, output, pooling, offsets)).results[0]
    assert res.count == lengths.size
    vals = dequantize_rows(file_rows(store, "v1", "unified", rows), DIM).astype(np.float64)
    want = np.stack([vals[a:b].sum(0) for a, b in itertools.pairwise(offsets)])
    if pooling == pb.POOLING_MEAN:
        want /= np.maximum(lengths, 1)[:, None]
    got = values(res, output)
    assert close(got, want, output)
    assert not got[lengths == 0].any()
    # Pooling without offsets: one row per bag, i.e. the rows themselves.
    res = lookup(stubs["s1"], group("unified", rows[:5], output, pooling)).results[0]
    assert res.count == 5 and close(values(res, output), vals[:5], output)


def test_two_shards_together_serve_the_whole_table(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]
                                                   ) -> None:
    rows = np.random.default_rng(3).integers(0, ROWS, 2000)
    shard, _ = shard_of(rows, ROWS, 2)
    got = np.empty((rows.size, ROW_BYTES), np.uint8)
    for k in (0, 1):
        res = lookup(stubs[f"s{k}"], group("unified", rows[shard == k])).results[0]
        got[shard == k] = np.frombuffer(res.data, np.uint8).reshape(-1, ROW_BYTES)
    assert np.array_equal(got, file_rows(store, "v1", "unified", rows))


def test_two_replicas_of_a_shard_answer_identically(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    req = (group("unified", np.arange(0, 500, 7), pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 10, 72]),
           group("cats", np.arange(18)))
    assert lookup(stubs["s0"], *req) == lookup(stubs["r0"], *req)


# ------------------------------------------------------------------------- status codes

_R = np.array([1, 2, 3])
BAD_REQUESTS = [
    ("out of range", dict(tables=[group("unified", [5, 499, 500, 7])]), C.INVALID_ARGUMENT,
     r"table 'unified': row 500 \(rows\[2\]\) is outside shard 0 of 2's range \[0, 500\)"),
    ("negative row", dict(tables=[group("cats", [-4])]), C.INVALID_ARGUMENT, r"table 'cats': row -4 "),
    ("rows bytes", dict(tables=[pb.TableLookup(table="unified", rows=b"\x01" * 12)]), C.INVALID_ARGUMENT,
     r"table 'unified': rows has 12 bytes, not a whole number of int64"),
    ("offsets bytes", dict(tables=[pb.TableLookup(table="unified", rows=_R.astype("<i8").tobytes(),
                                                  offsets=b"\x00" * 9, pooling=pb.POOLING_SUM,
                                                  output=pb.OUTPUT_FP16)]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets has 9 bytes"),
    ("offsets start", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_SUM, [1, 3])]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets\[0\] must be 0, got 1"),
    ("offsets end", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_SUM, [0, 2])]),
     C.INVALID_ARGUMENT, r"offsets\[-1\] must equal the number of rows 3, got 2"),
    ("offsets order", dict(tables=[group("unified", _R, pb.OUTPUT_FP32, pb.POOLING_MEAN, [0, 2, 1, 3])]),
     C.INVALID_ARGUMENT, r"non-decreasing, offsets\[2\] = 1 < offsets\[1\] = 2"),
    ("unknown table", dict(tables=[group("nope", _R)]), C.INVALID_ARGUMENT,
     r"table 'nope': no such table in tiny/v1 \(tables: cats, unified\)"),
    ("packed pooled", dict(tables=[group("unified", _R, pb.OUTPUT_INT4_PACKED, pb.POOLING_SUM)]),
     C.INVALID_ARGUMENT, r"table 'unified': OUTPUT_INT4_PACKED .* needs POOLING_NONE, got POOLING_SUM"),
    ("offsets unpooled", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_NONE, [0, 3])]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets must be empty with POOLING_NONE"),
    ("bad enum", dict(tables=[pb.TableLookup(table="cats", output=7)]),  # type: ignore[arg-type]
     C.INVALID_ARGUMENT, r"table 'cats': unknown output 7"),
    ("too many rows", dict(tables=[group("unified", np.zeros(3000)), group("cats", np.zeros(2001))]),
     C.INVALID_ARGUMENT, r"request asks for 5001 rows, more than .*--max-rows-per-request=5000"),
    ("unknown version", dict(version="v9"), C.FAILED_PRECONDITION,
     r"version tiny/v9 is not loaded on shard 0 of 2 \(ready: tiny/v1\)"),
    ("unknown model", dict(model="other"), C.FAILED_PRECONDITION, r"version other/v1 is not loaded"),
    ("fingerprint", dict(fingerprint="sha256:feed"), C.FAILED_PRECONDITION,
     r"tiny/v1 on shard 0 has fingerprint sha256:[0-9a-f]{64}, the request expects sha256:feed"),
]


# The machine-readable reason of each case (x-embedding-reason / LookupFailure.reason): a
# shard without the version and a real fingerprint disagreement share FAILED_PRECONDITION.
REASONS = {"too many rows": "over_limit", "unknown version": "version_not_loaded",
           "unknown model": "version_not_loaded", "fingerprint": "fingerprint_mismatch"}


def reason_of(case: str) -> str:
    return REASONS.get(case, "invalid_argument")


@pytest.mark.parametrize(("case", "fields", "code", "message"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_their_code_and_message(stubs: dict[str, pbg.EmbeddingServiceStub], case: str,
                                                 fields: dict[str, object], code: grpc.StatusCode,
                                                 message: str) -> None:
    req = pb.LookupRequest(**{"model": "tiny", "version": "v1", **fields})  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as e:
        stubs["s0"].Lookup(req, timeout=10)
    assert e.value.code() == code, e.value.details()
    assert re.search(message, e.value.details()), e.value.details()
    assert ("x-embedding-reason", reason_of(case)) in e.value.trailing_metadata()


def test_deadlines_are_honoured(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    big = group("unified", np.zeros(2_000_000, np.int64), pb.OUTPUT_FP32)
    with pytest.raises(grpc.RpcError) as e:
        lookup(stubs["r0"], big, big, timeout=0.02)
    assert e.value.code() == C.DEADLINE_EXCEEDED
    assert lookup(stubs["r0"], group("cats", [1])).results[0].count == 1


def test_overload_is_resource_exhausted(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    # Thousands of one-row groups: each request stays in its handler for a long while.
    heavy = [group("unified", [700], pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 1])] * 3000
    codes: list[grpc.StatusCode] = []
    details: list[str] = []

    def one(_: int) -> None:
        try:
            for _ in range(3):
                lookup(stubs["s1"], *heavy, timeout=30)
            codes.append(C.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            details.append(e.details())

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(12)))
    assert C.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED}
    assert any("overloaded: 2 lookups already in flight (--max-concurrent)" in d for d in details)
    assert lookup(stubs["s1"], group("cats", [20])).results[0].count == 1



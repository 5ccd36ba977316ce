"""The committed generated modules are fresh, and the wire contract round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protos import embedding_pb2, ranker_pb2
from protos.generate import PACKAGE_DIR, generate, generated_names


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generated_names())
    for fresh in written:
        committed = PACKAGE_DIR / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed} is stale relative to the .proto sources: run `make protos`"
        )


def test_lookup_request_round_trip() -> None:
    rows = np.arange(10, 30, dtype=np.int64)
    offsets = np.array([0, 5, 5, 20], dtype=np.int64)
    req = embedding_pb2.LookupRequest(
        model="demo",
        version="v1",
        fingerprint="ab" * 32,
        tables=[
            embedding_pb2.TableLookup(
                table="t0",
                rows=rows.astype("<i8").tobytes(),
                offsets=offsets.astype("<i8").tobytes(),
                pooling=embedding_pb2.POOLING_MEAN,
                output=embedding_pb2.OUTPUT_FP16,
            ),
            embedding_pb2.TableLookup(table="t1", rows=rows[:3].astype("<i8").tobytes()),
        ],
    )
    back = embedding_pb2.LookupRequest.FromString(req.SerializeToString())
    assert back == req
    assert (back.model, back.version, back.fingerprint) == ("demo", "v1", "ab" * 32)
    t0, t1 = back.tables
    np.testing.assert_array_equal(np.frombuffer(t0.rows, dtype="<i8"), rows)
    np.testing.assert_array_equal(np.frombuffer(t0.offsets, dtype="<i8"), offsets)
    assert t0.pooling == embedding_pb2.POOLING_MEAN
    assert t0.output == embedding_pb2.OUTPUT_FP16
    # Defaults: no pooling, packed INT4 rows, one row per bag.
    assert t1.pooling == embedding_pb2.POOLING_NONE
    assert t1.output == embedding_pb2.OUTPUT_INT4_PACKED
    assert t1.offsets == b""


def test_rank_response_round_trip() -> None:
    scores = np.linspace(0, 1, 7, dtype=np.float32)
    resp = ranker_pb2.RankResponse(
        request_id="r1", model="demo", version="v2", scores=scores.astype("<f4").tobytes()
    )
    back = ranker_pb2.RankResponse.FromString(resp.SerializeToString())
    np.testing.assert_array_equal(np.frombuffer(back.scores, dtype="<f4"), scores)


def test_embedding_service_methods() -> None:
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "hybrid.embedding.v1.EmbeddingService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "Lookup": ("LookupRequest", "LookupResponse"),
        "LookupStream": ("LookupRequest", "LookupResponse"),
        "LoadVersion": ("LoadVersionRequest", "VersionInfo"),
        "UnloadVersion": ("UnloadVersionRequest", "VersionInfo"),
        "ListVersions": ("ListVersionsRequest", "ListVersionsResponse"),
        "CheckFit": ("LoadVersionRequest", "FitInfo"),
        "ApplyDeltas": ("ApplyDeltasRequest", "VersionInfo"),
    }
    streaming = {m.name for m in service.methods if m.client_streaming and m.server_streaming}
    assert streaming == {"LookupStream"}

"""Ranker request bodies: protobuf decodes like JSON, and every bad field is named."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from modelpack.requests import Envelope, decode_request
from modelpack.schema import DenseFeature
from protos import ranker_pb2
from ranker_server import codec
from ranker_server.errors import RankError
from tests.helpers_store import TINY_SCHEMA, tiny_request


def _proto(req: dict[str, Any]) -> ranker_pb2.RankRequest:
    msg: ranker_pb2.RankRequest = ranker_pb2.RankRequest.FromString(
        codec.encode_request(req, TINY_SCHEMA))
    return msg


def _decode_proto(msg: ranker_pb2.RankRequest, max_candidates: int = 100) -> Any:
    parsed = codec.parse_body(msg.SerializeToString(), "protobuf")
    return codec.decode(parsed, TINY_SCHEMA, max_candidates)


def test_protobuf_decodes_exactly_like_json() -> None:
    req: dict[str, Any] = tiny_request(6, seed=3)
    req["user"]["user_recent"] = [5, -7, 2**62, 9, 11, 13, 15]  # longer than max_length 5
    req["user"]["user_activity"] = 0.25  # exactly representable in float32
    for i, c in enumerate(req["candidates"]):
        c["ad_bid"] = 0.5 * i
    want = decode_request(TINY_SCHEMA, req)
    parsed = codec.parse_body(_proto(req).SerializeToString(), "protobuf")
    got = codec.decode(parsed, TINY_SCHEMA, 100)
    assert got.num_candidates == want.num_candidates == 6
    for name, col in want.sparse.items():
        np.testing.assert_array_equal(got.sparse[name].ids, col.ids, err_msg=name)
        np.testing.assert_array_equal(got.sparse[name].lengths, col.lengths, err_msg=name)
    np.testing.assert_array_equal(got.dense, want.dense)
    assert parsed.envelope == codec.parse_body(json.dumps(req).encode(), "json").envelope
    assert parsed.envelope.request_id == req["request_id"]


def test_both_formats_parse_to_one_envelope_checked_before_the_features() -> None:
    req: dict[str, Any] = {**tiny_request(2), "timeout_ms": 250}
    j = codec.parse_body(json.dumps(req).encode(), "json")
    p = codec.parse_body(codec.encode_request(req, TINY_SCHEMA), "protobuf")
    assert j.envelope == p.envelope == Envelope(req["request_id"], req["model"], None, 250)
    # The envelope alone is read: features this bad are left for decode() to refuse.
    junk = codec.parse_body(b'{"model": "tiny", "version": "v2", "user": 5}', "json")
    assert junk.envelope == Envelope("", "tiny", "v2", None)
    with pytest.raises(RankError) as e:
        codec.decode(junk, TINY_SCHEMA, 100)
    assert (e.value.status, e.value.field) == (422, "user")
    zero = ranker_pb2.RankRequest(request_id="z", timeout_ms=-3)  # <= 0: the server default
    assert codec.parse_body(zero.SerializeToString(), "protobuf").envelope.timeout_ms is None


def test_content_type_picks_the_decoder() -> None:
    assert codec.body_kind("application/x-protobuf") == "protobuf"
    assert codec.body_kind("application/protobuf; charset=binary") == "protobuf"
    assert codec.body_kind("application/json") == "json"
    assert codec.body_kind("") == "json"
    assert codec.body_kind("application/x-www-form-urlencoded") == "json"  # curl -d


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body"),
    (b"\xff\xfe", 400, "body"),
    (b"[" * 100_000, 400, "body"),
    (b"1" * 5000, 400, "body"),  # past Python's int digit limit: still a 400
    (b"[1, 2]", 422, "body"),
    (b'{"model": 3}', 422, "model"),
    (b'{"version": 1}', 422, "version"),
    (b'{"request_id": 7}', 422, "request_id"),
    (b'{"timeout_ms": 0}', 422, "timeout_ms"),
    (b'{"timeout_ms": true}', 422, "timeout_ms"),
    (b'{"surprise": 1}', 422, "surprise"),
])
def test_json_envelope_errors(body: bytes, status: int, field: str) -> None:
    with pytest.raises(RankError) as e:
        codec.parse_body(body, "json")
    assert (e.value.status, e.value.field) == (status, field)


def _mutate(fn: Any) -> ranker_pb2.RankRequest:
    msg = _proto(tiny_request(3))
    fn(msg)
    return msg


def _feature(features: Any, name: str) -> Any:
    return next(f for f in features if f.name == name)


def _set(side: str, name: str, attr: str, value: bytes) -> Any:
    return lambda m: setattr(_feature(getattr(m, side), name), attr, value)


@pytest.mark.parametrize("mutation, field", [
    (lambda m: setattr(m, "num_candidates", 0), "num_candidates"),
    (lambda m: setattr(m, "num_candidates", 101), "candidates"),
    (lambda m: setattr(m, "request_id", "x" * 257), "request_id"),
    (lambda m: m.user.add(name="nope"), "user[3].name"),
    (lambda m: m.candidates.add(name="ad_id"), "candidates.ad_id"),
    (lambda m: m.user.remove(_feature(m.user, "user_id")), "user.user_id"),
    (_set("candidates", "ad_id", "ids", b"\x00" * 7), "candidates.ad_id.ids"),
    (_set("candidates", "ad_id", "ids", b"\x00" * 16), "candidates.ad_id.ids"),
    (lambda m: setattr(_feature(m.candidates, "ad_id"), "lengths", b"\x01\x00\x00\x00"),
     "candidates.ad_id.lengths"),
    (lambda m: setattr(_feature(m.candidates, "ad_id"), "values", b"\x00" * 12),
     "candidates.ad_id.values"),
    (_set("user", "user_recent", "lengths", b""), "user.user_recent.lengths"),
    (lambda m: setattr(_feature(m.user, "user_recent"), "lengths",
                       np.array([-1], "<i4").tobytes()), "user.user_recent.lengths"),
    (lambda m: setattr(_feature(m.user, "user_recent"), "lengths",
                       np.array([4], "<i4").tobytes()), "user.user_recent.ids"),
    (lambda m: setattr(_feature(m.candidates, "ad_bid"), "values",
                       np.array([1, np.nan, 2], "<f4").tobytes()), "candidates.ad_bid.values"),
    (lambda m: setattr(_feature(m.candidates, "ad_bid"), "values",
                       np.array([1, 2], "<f4").tobytes()), "candidates.ad_bid.values"),
    (lambda m: setattr(_feature(m.candidates, "ad_bid"), "ids", b"\x00" * 24),
     "candidates.ad_bid.ids"),
])
def test_protobuf_field_errors(mutation: Any, field: str) -> None:
    with pytest.raises(RankError) as e:
        _decode_proto(_mutate(mutation))
    assert e.value.status == 422 and e.value.field == field, e.value.message
    assert e.value.message.startswith(field)


def test_both_formats_share_one_normalization_and_its_overflow_check() -> None:
    tight = DenseFeature("ad_bid", "candidate", "standard", mean=1.0, std=1e-39)
    schema = dataclasses.replace(TINY_SCHEMA, dense=(TINY_SCHEMA.dense[0], tight))
    req: dict[str, Any] = tiny_request(3)
    for i, c in enumerate(req["candidates"]):
        c["ad_bid"] = 1.0 if i != 1 else 2.0  # (2 - 1) / 1e-39 is past float32's range
    bodies: list[tuple[bytes, codec.BodyKind]] = [
        (json.dumps(req).encode(), "json"), (codec.encode_request(req, schema), "protobuf")]
    for body, kind in bodies:
        with pytest.raises(RankError) as e:
            codec.decode(codec.parse_body(body, kind), schema, 10)
        assert (e.value.status, e.value.field) == (422, "candidates[1].ad_bid"), kind
    x = np.array([-3.0, 0.0, 2.5, 1e6])
    want = ((np.log1p(np.maximum(x, 0.0)) - 0.5) / 2.0).astype(np.float32)
    got = DenseFeature("f", "user", "log1p_standard", 0.5, 2.0).normalize_array(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_garbage_protobuf_is_400() -> None:
    with pytest.raises(RankError) as e:
        codec.parse_body(b"\x0a\xff\xff\xff\xff\x0f", "protobuf")
    assert (e.value.status, e.value.field) == (400, "body")


def test_responses_in_the_request_format() -> None:
    scores = np.array([0.25, 0.5], np.float32)
    body, media = codec.encode_response("json", "r1", "tiny", "v1", scores, 3)
    assert media == "application/json"
    assert json.loads(body) == {"request_id": "r1", "model": "tiny", "version": "v1", "seq": 3,
                                "scores": [0.25, 0.5]}
    body, media = codec.encode_response("protobuf", "r1", "tiny", "v1", scores, 3)
    msg = ranker_pb2.RankResponse.FromString(body)
    assert media == "application/x-protobuf" and (msg.version, msg.seq) == ("v1", 3)
    np.testing.assert_array_equal(np.frombuffer(msg.scores, "<f4"), scores)

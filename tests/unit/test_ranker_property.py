"""Property: nothing a client sends to POST /v1/rank gets a 5xx (>= 1000 generated bodies).

Bodies are generated near the tiny schema (right feature names, wrong types, NaN,
huge integers, oversized lists, unknown keys), as arbitrary bytes, and as protobuf
RankRequests with random columns, under random content types. They go to the real app
in-process (local tables), one event loop for all examples.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import ranker_pb2
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_version

MAX_CANDIDATES = 20
Post = Callable[[bytes, str], tuple[int, Any]]

junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                      st.integers(), max_size=2))
valid_id = st.integers(-(2**63), 2**63 - 1)
an_id = st.one_of(valid_id, valid_id, valid_id, valid_id, st.integers(), junk)
valid_number = st.floats(-1e6, 1e6)
a_number = st.one_of(valid_number, valid_number, valid_number, st.floats(),
                     st.sampled_from([1e39, -1e300, 3.4e38, 5e-324]),
                     st.integers(-10**6, 10**6), junk)
extra = st.one_of(st.just({}), st.just({}), st.just({}), st.just({}),
                  st.dictionaries(st.sampled_from(["bogus", "", "user_id", "ad_id", "ad_bid"]),
                                  junk, max_size=1))


def _entity(fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda d, e: {**d, **e}, st.fixed_dictionaries(fields), extra)


user = _entity({"user_id": an_id,
                "user_recent": st.one_of(st.lists(an_id, max_size=8), st.lists(valid_id), junk),
                "user_activity": a_number})
candidate = _entity({"ad_id": an_id, "ad_cat": an_id, "ad_bid": a_number})
few = st.lists(candidate, min_size=1, max_size=4)
json_request = st.fixed_dictionaries(
    {"user": st.one_of(user, user, user, junk),
     "candidates": st.one_of(few, few, few, st.lists(candidate, max_size=MAX_CANDIDATES + 1),
                             junk)},
    optional={"request_id": st.one_of(st.text(max_size=8), st.text(max_size=8), junk),
              "model": st.one_of(st.sampled_from(["tiny", "tiny", "", "other"]), junk),
              "version": st.one_of(st.sampled_from(["v1", "v1", "v2"]), junk),
              "timeout_ms": st.one_of(st.integers(1, 10**12), st.integers(-5, 10), junk),
              "labels": junk})
valid_request = st.fixed_dictionaries({
    "request_id": st.text(max_size=8), "model": st.just("tiny"),
    "user": st.fixed_dictionaries({"user_id": valid_id, "user_recent": st.lists(valid_id),
                                   "user_activity": valid_number}),
    "candidates": st.lists(st.fixed_dictionaries({"ad_id": valid_id, "ad_cat": valid_id,
                                                  "ad_bid": valid_number}),
                           min_size=1, max_size=MAX_CANDIDATES)})
wild_request = st.builds(lambda r, k, v: {**r, k: v}, json_request,
                         st.text(max_size=6), junk)

names = st.sampled_from(["user_id", "user_recent", "user_activity", "ad_id", "ad_cat", "ad_bid",
                         "", "nope"])
column = st.one_of(st.binary(max_size=48),
                   st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6).map(
                       lambda v: np.array(v, "<i8").tobytes()))
feature = st.builds(lambda n, i, ln, v: ranker_pb2.Feature(name=n, ids=i, lengths=ln, values=v),
                    names, column, st.one_of(st.just(b""), st.binary(max_size=12)),
                    st.one_of(st.just(b""), st.binary(max_size=24)))
proto_request = st.builds(
    lambda u, c, n, t: ranker_pb2.RankRequest(request_id="p", model="tiny", timeout_ms=t,
                                              user=u, candidates=c, num_candidates=n),
    st.lists(feature, max_size=4), st.lists(feature, max_size=4),
    st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1))

content_types = st.sampled_from(["application/json", "", "text/plain", "application/x-protobuf"])
bodies = st.one_of(
    st.tuples(valid_request.map(lambda r: json.dumps(r).encode()), st.just("application/json")),
    st.tuples(json_request.map(lambda r: json.dumps(r).encode()), st.just("application/json")),
    st.tuples(json_request.map(lambda r: json.dumps(r).encode()), st.just("application/json")),
    st.tuples(wild_request.map(lambda r: json.dumps(r).encode()), st.just("application/json")),
    st.tuples(proto_request.map(lambda m: m.SerializeToString()),
              st.just("application/x-protobuf")),
    st.tuples(st.binary(max_size=64), content_types),
)


@pytest.fixture(scope="module")
def post(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Post]:
    store = tmp_path_factory.mktemp("store")
    for v in ("v1", "v2"):
        tiny_version(store, v)
    config = RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                          max_batch_wait_ms=0.0, max_candidates=MAX_CANDIDATES,
                          max_timeout_ms=10_000, default_timeout_ms=10_000)
    loop = asyncio.new_event_loop()
    app = serve_in_process(config)
    client, _ = loop.run_until_complete(app.__aenter__())

    def send(body: bytes, content_type: str) -> tuple[int, Any]:
        r = loop.run_until_complete(client.post("/v1/rank", content=body,
                                                headers={"content-type": content_type}))
        return r.status_code, r.json() if r.headers["content-type"] == "application/json" else None

    yield send
    loop.run_until_complete(app.__aexit__(None, None, None))
    loop.close()


def test_generated_requests_never_get_a_5xx(post: Post) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies)
    def check(case: tuple[bytes, str]) -> None:
        status, body = post(*case)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, body, case)
        if status == 200 and body is not None:
            assert all(math.isfinite(s) and 0 <= s <= 1 for s in body["scores"])
        elif status != 200:
            assert body is not None and body["detail"]

    check()
    assert sum(seen.values()) >= 1000, seen
    assert seen.get(200, 0) > 100 and seen.get(422, 0) > 100, seen  # both paths exercised

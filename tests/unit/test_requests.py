"""Request decoding: columnar arrays, row plans, and a named error for every bad field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelpack.hashing import rows_for
from modelpack.requests import RequestError, decode_request, plan_rows
from modelpack.schema import TableSpec
from tests.helpers_store import DELETE, TINY_SCHEMA, mutated_request, tiny_request

TABLES = {"unified": TableSpec("unified", 1000, 16, 2), "cats": TableSpec("cats", 37, 16)}


def test_decode_and_plan() -> None:
    req = tiny_request(4)
    d = decode_request(TINY_SCHEMA, req)
    assert d.num_candidates == 4 and d.dense.shape == (4, 2) and d.dense.dtype == np.float32
    np.testing.assert_array_equal(d.dense[:, 0], 0.5)
    plan = {p.feature: p for p in plan_rows(TINY_SCHEMA, TABLES, d)}
    assert plan["user_recent"].offsets.tolist() == [0, 3]
    assert plan["ad_id"].offsets.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(plan["ad_cat"].rows, rows_for(np.arange(4), 203, 37))


def test_multi_valued_longer_than_max_length_is_truncated() -> None:
    req = tiny_request(1)
    req["user"]["user_recent"] = list(range(9))  # type: ignore[index]
    d = decode_request(TINY_SCHEMA, req)
    assert d.sparse["user_recent"].ids.tolist() == [0, 1, 2, 3, 4]


def _mutated(path: list[Any], value: Any) -> dict[str, Any]:
    return mutated_request(path, value, n=2)




@pytest.mark.parametrize(("path", "value", "field"), [
    (["user", "user_id"], "12", "user.user_id"),
    (["user", "user_id"], 1.5, "user.user_id"),
    (["user", "user_id"], True, "user.user_id"),
    (["user", "user_id"], 2**64, "user.user_id"),
    (["user", "user_id"], DELETE, "user.user_id"),
    (["user", "bogus"], 1, "user.bogus"),
    (["user", "user_recent"], 5, "user.user_recent"),
    (["user", "user_recent"], [1, "x"], "user.user_recent[1]"),
    (["user", "user_activity"], float("nan"), "user.user_activity"),
    (["user", "user_activity"], "fast", "user.user_activity"),
    (["candidates", 1, "ad_id"], None, "candidates[1].ad_id"),
    (["candidates", 1, "ad_bid"], float("inf"), "candidates[1].ad_bid"),
    (["candidates", 0, "user_id"], 1, "candidates[0].user_id"),
    (["candidates"], [], "candidates"),
    (["candidates"], {}, "candidates"),
    (["candidates", 0], 7, "candidates[0]"),
    (["user"], [], "user"),
    (["timeout_ms"], -5, "timeout_ms"),
    (["request_id"], 5, "request_id"),
    (["surprise"], 1, "surprise"),
])
def test_bad_fields_are_named(path: list[Any], value: Any, field: str) -> None:
    with pytest.raises(RequestError) as e:
        decode_request(TINY_SCHEMA, _mutated(path, value))
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_too_many_candidates_and_non_object() -> None:
    with pytest.raises(RequestError, match="at most 2"):
        decode_request(TINY_SCHEMA, tiny_request(3), max_candidates=2)
    with pytest.raises(RequestError, match="body: must be a JSON object"):
        decode_request(TINY_SCHEMA, [1, 2])


def test_finite_values_that_overflow_float32_are_refused() -> None:
    with pytest.raises(RequestError) as e:
        decode_request(TINY_SCHEMA, _mutated(["candidates", 1, "ad_bid"], 1e300))
    assert e.value.field == "candidates[1].ad_bid"
    with pytest.raises(RequestError) as e:
        decode_request(TINY_SCHEMA, _mutated(["candidates", 0, "ad_bid"], 10**400))
    assert e.value.field == "candidates[0].ad_bid"


def test_fast_path_equals_slow_semantics_for_mixed_int_float_dense() -> None:
    req = _mutated(["candidates", 0, "ad_bid"], 3)  # an int where floats are usual
    d = decode_request(TINY_SCHEMA, req)
    assert d.dense[0, 1] == 3.0 and d.dense.dtype == np.float32

"""The OpenAPI fuzzer of R6: requests generated from an app's own OpenAPI document.

Path and query parameters and JSON bodies come from the document's schemas, plus
type-confused values, junk bodies and odd content types, with and without the admin
token; bodies that once gave a 500 (KNOWN_BAD_BODIES) go first. Deterministic: FUZZ
derandomizes hypothesis and keeps no example database.
"""

from __future__ import annotations

import json
import string
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOKEN = "fuzz-token"
CASES_PER_APP = 600
Send = Callable[[str, str, dict[str, str], bytes | None, dict[str, str]], tuple[int, str]]
# Fixed seed, and no local example database that could make CI's run differ from the last.
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
# (body, content type) pairs that once gave 500s (issue 11): each must be a 4xx.
KNOWN_BAD_BODIES = [
    (b"\x80", "application/json"), (b'{"version": "v2"}', "text/plain"),
    (b"model: m\nversion: v2", ""), (b"\x00\x01\xff", "application/octet-stream"),
    (b"model=m&version=v2", "application/x-www-form-urlencoded"),
    (b"\n\x01m\x12\x02v2", "application/x-protobuf"),
    (b'{"model": "m", "version": "v2", "bake_s": NaN, "split": {"v1": NaN}}', "application/json"),
    (b'{"model": "m", "version": "v2", "bake_s": Infinity, "split": {"v1": Infinity}}',
     "application/json"),
    (b'{"model": "m", "version": "v2", "bake_s": 1e400, "split": {"v1": 1e400}}',
     "application/json"),
    (b'{"version": "v2", "split": {"v1": ' + b"9" * 400 + b"}}", "application/json"),
]

# ------------------------------------------------------------------ JSON schema -> strategy

junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                 st.text(max_size=6), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
KNOWN = "@known"
names = st.one_of(st.sampled_from(["v1", "v2", "v3", "tiny", "m", "ads_ctr", "", "..", "../etc",
                                   KNOWN, KNOWN,
                                   "v1/../v2", "a" * 300, "%00", "\u00e9", " v1"]),
                  st.text(string.ascii_letters + string.digits + "._-", max_size=12),
                  st.text(max_size=8))


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not ref:
        return schema
    node: Any = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return _resolve(node, doc)


def from_schema(schema: dict[str, Any], doc: dict[str, Any], depth: int = 0
                ) -> st.SearchStrategy[Any]:
    """Values that mostly follow `schema` (every field present or not), sometimes junk."""
    schema = _resolve(schema, doc)
    if depth > 4:
        return junk
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return st.one_of(*(from_schema(s, doc, depth + 1) for s in schema[key]), junk)
    if "enum" in schema:
        return st.one_of(st.sampled_from(schema["enum"]), junk)
    t = schema.get("type")
    if t == "object" or "properties" in schema:
        props = {k: from_schema(v, doc, depth + 1) for k, v in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        obj = st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                    optional={k: v for k, v in props.items() if k not in required})
        extra = st.dictionaries(st.text(max_size=5), junk, max_size=2)
        return st.one_of(obj, obj, obj, st.builds(lambda a, b: {**b, **a}, obj, extra), junk)
    if t == "array":
        items = from_schema(schema.get("items", {}), doc, depth + 1)
        return st.one_of(st.lists(items, max_size=5), junk)
    if t == "integer":
        return st.one_of(st.integers(-5, 200), st.integers(), junk)
    if t == "number":
        return st.one_of(st.floats(-10, 1e5), st.floats(), st.integers(), junk)
    if t == "string":
        return st.one_of(names, junk)
    if t == "boolean":
        return st.one_of(st.booleans(), junk)
    return junk


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method.upper(), op) for path, item in doc["paths"].items()
            for method, op in item.items() if method in ("get", "post", "put", "delete", "patch")]


def request_for(doc: dict[str, Any], path: str, op: dict[str, Any],
                example: st.SearchStrategy[Any] | None = None
                ) -> st.SearchStrategy[tuple[str, dict[str, str], bytes | None, dict[str, str]]]:
    """(url path, query, body, headers) for one operation of `doc`; `example`: valid bodies."""
    params = [_resolve(p, doc) for p in op.get("parameters", [])]
    path_params = {p["name"]: names for p in params if p["in"] == "path"}
    query = {p["name"]: from_schema(p.get("schema", {}), doc).map(str)
             for p in params if p["in"] == "query"}
    content = op.get("requestBody", {}).get("content", {})
    json_schema = content.get("application/json", {}).get("schema")
    typed = (from_schema(json_schema, doc).map(lambda v: json.dumps(v).encode())
             if json_schema is not None else st.nothing())
    good = (example.map(lambda v: json.dumps(v).encode()) if example is not None
            else st.nothing())
    bodies = st.one_of(good, typed, typed, typed, st.none(),
                       junk.map(lambda v: json.dumps(v).encode()),
                       st.binary(max_size=64), st.just(b"{"), st.just(b"[" * 2000))
    auth = st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", f"Bearer {TOKEN}", "",
                            "Bearer nope",
                            "Basic x", f"bearer {TOKEN} "])
    ctype = st.sampled_from(["application/json", "application/json", "text/plain", "",
                             "application/x-protobuf"])

    def build(pp: dict[str, str], q: dict[str, str], body: bytes | None, a: str, c: str
              ) -> tuple[str, dict[str, str], bytes | None, dict[str, str]]:
        url = path
        for k, v in pp.items():
            url = url.replace("{" + k + "}", urllib.parse.quote(v, safe="@"))
        headers = {"content-type": c}
        if a:
            headers["authorization"] = a
        return url, q, body, headers

    fuzzed = st.builds(build, st.fixed_dictionaries(path_params),
                       st.fixed_dictionaries({}, optional=query), bodies, auth, ctype)
    if example is None:
        return fuzzed
    # A well-formed call (JSON, the right token, a body that validates), so that the state
    # changing paths really run (loads, activations, rollouts) while the fuzz goes on.
    valid = st.builds(build, st.fixed_dictionaries(path_params), st.just({}), good,
                      st.just(f"Bearer {TOKEN}"), st.just("application/json"))
    return st.one_of(valid, fuzzed, fuzzed)


def fuzz(doc: dict[str, Any], send: Send, cases: int,
         examples: dict[str, st.SearchStrategy[Any]] | None = None) -> Counter[tuple[str, int]]:
    """`cases` generated requests over every operation; `examples["POST /path"]`: valid bodies."""
    ops = operations(doc)
    seen: Counter[tuple[str, int]] = Counter()
    strategies = {(p, m): request_for(doc, p, op, (examples or {}).get(f"{m} {p}"))
                  for p, m, op in ops}

    for path, method, op in ops:
        if "requestBody" not in op:
            continue
        url = path
        for p in op.get("parameters", []):
            url = url.replace("{" + _resolve(p, doc)["name"] + "}", "m")
        for body, ctype in KNOWN_BAD_BODIES:
            for auth in ({"authorization": f"Bearer {TOKEN}"}, {}):
                headers = {**auth, "content-type": ctype} if ctype else auth
                status, text = send(method, url, {}, body, headers)
                seen[(f"{method} {path}", status)] += 1
                assert 400 <= status < 500, (method, url, body, headers, status, text[:500])

    @settings(FUZZ, max_examples=cases)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        path, method, _ = data.draw(st.sampled_from(ops))
        url, query, body, headers = data.draw(strategies[(path, method)])
        status, text = send(method, url, query, body, headers)
        seen[(f"{method} {path}", status)] += 1
        assert status < 500, (method, url, query, body, headers, status, text[:500])

    one()
    return seen


def report(name: str, seen: Counter[tuple[str, int]]) -> str:
    per_op: dict[str, Counter[int]] = {}
    for (op, status), n in seen.items():
        per_op.setdefault(op, Counter())[status] += n
    ops = "; ".join(f"{op} {dict(sorted(c.items()))}" for op, c in sorted(per_op.items()))
    return f"{name}: {sum(seen.values())} cases over {len(per_op)} operations, 0 5xx ({ops})"

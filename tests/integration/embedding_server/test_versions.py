"""Admin: load, list, unload, refusals, memory budget, checksums, draining (fixtures: conftest.py)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.integration.embedding_server.fleet import (
    AUTH,
    ROW_BYTES,
    TOKEN,
    C,
    file_rows,
    fingerprint,
    group,
    load_version,
    lookup,
    unload_version,
)

# ------------------------------------------------------------------------- versions


def test_admin_needs_the_bearer_token(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    req = pb.LoadVersionRequest(model="tiny", version="v2")
    cases = [(stubs["s0"], None, "needs metadata 'authorization: Bearer <token>'"),
             (stubs["s0"], [("authorization", "Bearer wrong")], "wrong bearer token"),
             (stubs["s0"], [("authorization", f"Basic {TOKEN}")], "wrong bearer token"),
             (stubs["r0"], AUTH, "admin RPCs are disabled: .* without --admin-token-file")]
    for stub, md, message in cases:
        for call in (stub.LoadVersion, stub.UnloadVersion):
            with pytest.raises(grpc.RpcError) as e:
                call(req if call == stub.LoadVersion else pb.UnloadVersionRequest(model="tiny", version="v1"),
                     metadata=md, timeout=10)
            assert e.value.code() == C.UNAUTHENTICATED and re.search(message, e.value.details())
    # Read-only calls need no token.
    listing = stubs["s0"].ListVersions(pb.ListVersionsRequest(), timeout=10)
    assert [v.version for v in listing.versions] == ["v1"]
    assert stubs["r0"].CheckFit(req, timeout=10).fits


def test_load_serve_list_unload_round_trip(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s1"]
    fit = s.CheckFit(pb.LoadVersionRequest(model="tiny", version="v2"), timeout=10)
    assert fit.fits and fit.required_bytes == 500 * ROW_BYTES + 19 * ROW_BYTES
    info = load_version(s, "v2")
    assert (info.state, info.fingerprint, info.bytes) == (pb.VERSION_STATE_READY, fingerprint(store, "v2"),
                                                          fit.required_bytes)
    try:
        assert load_version(s, "v2") == info  # idempotent
        listing = s.ListVersions(pb.ListVersionsRequest(model="tiny"), timeout=10)
        assert [(v.version, v.state) for v in listing.versions] == [("v1", pb.VERSION_STATE_READY),
                                                                    ("v2", pb.VERSION_STATE_READY)]
        assert listing.memory_used_bytes == 2 * fit.required_bytes and listing.memory_budget_bytes == 20000
        rows = np.arange(500, 1000, 3)
        for v in ("v1", "v2"):
            resp = lookup(s, group("unified", rows), version=v, fingerprint=fingerprint(store, v))
            assert resp.version == v
            assert resp.results[0].data == file_rows(store, v, "unified", rows).tobytes()
    finally:
        gone = unload_version(s, "v2")
    assert gone.state == pb.VERSION_STATE_UNSPECIFIED and gone.in_flight == 0
    with pytest.raises(grpc.RpcError) as e:
        lookup(s, group("cats", [20]), version="v2")
    assert e.value.code() == C.FAILED_PRECONDITION
    assert unload_version(s, "v2").state == pb.VERSION_STATE_UNSPECIFIED  # idempotent


def test_admin_refusals(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    for version, code, message in (
            ("v9", C.NOT_FOUND, r"tiny/v9: no such version in store"),
            ("../v1", C.INVALID_ARGUMENT, r"invalid version name '\.\./v1'")):
        with pytest.raises(grpc.RpcError) as e:
            load_version(s, version)
        assert e.value.code() == code and re.search(message, e.value.details()), e.value.details()


def test_memory_budget_refuses_a_load_that_does_not_fit(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    need = 500 * ROW_BYTES + 18 * ROW_BYTES
    load_version(s, "v2")
    load_version(s, "v3")
    try:
        fit = s.CheckFit(pb.LoadVersionRequest(model="tiny", version="v4"), timeout=10)
        assert not fit.fits and fit.available_bytes == 20000 - 3 * need and "needs" in fit.reason
        with pytest.raises(grpc.RpcError) as e:
            load_version(s, "v4")
        assert e.value.code() == C.RESOURCE_EXHAUSTED
        assert (f"tiny/v4 needs {need} bytes of tables on shard 0, only {20000 - 3 * need} of the "
                f"20000-byte memory budget are free ({3 * need} used") in e.value.details()
        listing = s.ListVersions(pb.ListVersionsRequest(), timeout=10)
        assert [v.version for v in listing.versions] == ["v1", "v2", "v3"]
    finally:
        unload_version(s, "v2")
        unload_version(s, "v3")


def test_corrupt_byte_refuses_the_load_and_the_old_version_keeps_serving(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    with pytest.raises(grpc.RpcError) as e:
        load_version(s, "bad")
    assert e.value.code() == C.FAILED_PRECONDITION
    assert re.search(r"load of tiny/bad refused: .*shard-0-of-2.bin sha256 [0-9a-f]+ != manifest "
                     r"[0-9a-f]+ \(corrupt\)", e.value.details()), e.value.details()
    versions = {v.version: v for v in s.ListVersions(pb.ListVersionsRequest(), timeout=10).versions}
    assert versions["bad"].state == pb.VERSION_STATE_FAILED and "corrupt" in versions["bad"].error
    assert versions["bad"].bytes == 0 and versions["v1"].state == pb.VERSION_STATE_READY
    rows = np.arange(0, 500, 5)
    want = file_rows(store, "v1", "unified", rows).tobytes()
    assert lookup(s, group("unified", rows)).results[0].data == want
    with pytest.raises(grpc.RpcError) as e:
        lookup(s, group("unified", rows), version="bad")
    assert e.value.code() == C.FAILED_PRECONDITION and "is FAILED on shard 0" in e.value.details()
    assert unload_version(s, "bad").state == pb.VERSION_STATE_UNSPECIFIED
    # Shard 1 checks only its own file, which is intact.
    assert load_version(stubs["s1"], "bad").state == pb.VERSION_STATE_READY
    unload_version(stubs["s1"], "bad")


def test_unload_under_concurrent_lookups_loses_none(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]
                                                    ) -> None:
    s = stubs["s0"]
    load_version(s, "v2")
    rows = np.random.default_rng(5).integers(0, 500, 4000)
    want = {v: file_rows(store, v, "unified", rows).tobytes() for v in ("v1", "v2")}
    outcomes: dict[str, list[str]] = {"v1": [], "v2": []}
    stop = threading.Event()

    def hammer(version: str) -> None:
        while not stop.is_set():
            try:
                resp = lookup(s, group("unified", rows), version=version)
                ok = resp.version == version and resp.results[0].data == want[version]
                outcomes[version].append("ok" if ok else "WRONG DATA")
            except grpc.RpcError as e:
                gone = e.code() == C.FAILED_PRECONDITION and re.search("UNLOADING|not loaded", e.details())
                outcomes[version].append("refused" if gone else f"{e.code()}: {e.details()}")

    threads = [threading.Thread(target=hammer, args=(v,)) for v in ("v2", "v2", "v1")]
    for t in threads:
        t.start()
    time.sleep(0.3)
    info = unload_version(s, "v2", drain=10)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert info.in_flight == 0  # drained, not timed out
    assert set(outcomes["v1"]) == {"ok"}
    assert set(outcomes["v2"]) <= {"ok", "refused"}, set(outcomes["v2"])
    first_refusal = outcomes["v2"].index("refused")
    assert first_refusal > 0 and "refused" in outcomes["v2"][-2:]



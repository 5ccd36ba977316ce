"""VersionRegistry.apply_deltas in process: the readable window, idempotence, refusals that
change nothing, the memory budget, rebuilds below the window, unload and a failed replay."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_server.errors import DELTA_REFUSED, SEQ_NOT_APPLIED, VERSION_NOT_LOADED, ServiceError
from embedding_server.table_store import plan_version
from embedding_server.versions import VersionRegistry
from modelpack.delta_read import overlay_rows, read_chain
from modelpack.delta_write import write_delta_packed
from modelpack.manifest import read_manifest
from tests.helpers_store import tiny_version
from tests.unit.delta_helpers import base_rows, packed_rows

ROWS = np.array([3, 3, 0, 499, 250, 100, 7], dtype=np.int64)  # shard 0 of 2: [0, 500)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reg-store")
    tiny_version(root, "v1", seed=4)
    rng = np.random.default_rng(4)
    for _ in range(3):
        rows = np.unique(np.concatenate([[3, 250], rng.integers(0, 1000, 40)]))
        write_delta_packed(root / "tiny" / "v1", {"unified": (rows, packed_rows(rng, rows.size))})
    return root


def read(reg: VersionRegistry, seq: int) -> np.ndarray:
    e, loaded, state = reg.hold("tiny", "v1", "", seq)
    try:
        out = loaded.tables["unified"].gather(ROWS)
        ov = state.tables.get("unified")
        if ov is not None and (hits := ov.hits(ROWS)) is not None:
            out = ov.patch(out, hits)
        return out
    finally:
        reg.release(e)


def test_window_idempotence_refusal_rebuild_and_unload(store: Path) -> None:
    vdir = store / "tiny" / "v1"
    base = base_rows(vdir, read_manifest(vdir), "unified")
    chain = read_chain(vdir, 3)
    reg = VersionRegistry(store, 0, 2, budget=1 << 30, readable_seqs=2)
    reg.load("tiny", "v1")
    mapped = reg.used_bytes()
    e, rows = reg.apply_deltas("tiny", "v1", 2)  # 1 and 2 in one call: only 2 published
    assert (e.readable_seqs, e.applied_seq) == ((0, 2), 2) and rows > 0
    assert reg.used_bytes() == mapped + e.overlay_bytes
    assert reg.apply_deltas("tiny", "v1", 2) == (e, 0)  # idempotent
    e, _ = reg.apply_deltas("tiny", "v1", 3, chain[2].manifest.fingerprint)
    assert e.readable_seqs == (2, 3)
    for seq in (2, 3):
        want = overlay_rows(base[ROWS], ROWS, [d.tables["unified"] for d in chain[:seq]])
        assert read(reg, seq).tobytes() == want.tobytes()
    with pytest.raises(ServiceError, match=r"cannot be read at delta seq 0: readable seqs \[2, 3\]") as err:
        read(reg, 0)
    assert err.value.reason == SEQ_NOT_APPLIED
    # A delta that is not there, and a wrong expected fingerprint: nothing changes.
    for seq, fp, msg in ((4, "", r"tiny/v1 delta 4: directory is missing"),
                         (1, "sha256:nope", r"delta 1 has fingerprint .* expects sha256:nope")):
        with pytest.raises(ServiceError, match=msg) as err:
            reg.apply_deltas("tiny", "v1", seq, fp)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, DELTA_REFUSED)
        assert reg.snapshot()[0].readable_seqs == (2, 3)
    # Re-applying a readable seq makes it the newest (the controller does this after moving
    # the rankers back to it): the next apply drops 3, not 2.
    e, rows = reg.apply_deltas("tiny", "v1", 2)
    assert (e.readable_seqs, e.applied_seq, rows) == ((2, 3), 2, 0)
    e, _ = reg.apply_deltas("tiny", "v1", 1)  # below the window: rebuilt from V and delta 1
    assert e.readable_seqs == (1, 2)
    want = overlay_rows(base[ROWS], ROWS, [chain[0].tables["unified"]])
    assert read(reg, 1).tobytes() == want.tobytes()
    reg.unload("tiny", "v1", 1.0)
    assert reg.used_bytes() == 0
    with pytest.raises(ServiceError) as err:
        reg.apply_deltas("tiny", "v1", 1)
    assert err.value.reason == VERSION_NOT_LOADED


def test_overlay_counts_in_the_memory_budget(store: Path) -> None:
    mapped = plan_version(store, "tiny", "v1", 0, 2).nbytes
    reg = VersionRegistry(store, 0, 2, budget=mapped + 100)
    reg.load("tiny", "v1")
    with pytest.raises(ServiceError, match=r"tiny/v1 at delta seq 1 needs an overlay of \d+ bytes on "
                                           r"shard 0, only 100 of the \d+-byte memory budget") as err:
        reg.apply_deltas("tiny", "v1", 1)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    e = reg.snapshot()[0]
    assert (e.readable_seqs, e.overlay_bytes, reg.used_bytes()) == ((0,), 0, mapped)
    reg.fail("tiny", "v1", "replay of deltas 1..1 failed")  # what a failed startup replay does
    e = reg.snapshot()[0]
    assert (e.state, e.error, reg.used_bytes()) == ("FAILED", "replay of deltas 1..1 failed", 0)

"""Property: for random streams of deltas and random reads, a read at (V, s) is V's rows
with deltas 1..s applied in order, and compaction at s is the same table.

The model is a plain dict {row: bytes} updated delta by delta; what is checked against it
is overlay_rows (pure), the deltas written to disk and read back through the verifier, and
the compacted version's files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpack.delta_compact import compact
from modelpack.delta_read import TableDelta, fold, overlay_rows, read_chain
from modelpack.delta_write import write_delta_packed
from modelpack.manifest import read_manifest
from modelpack.scorer import TableReader
from tests.unit.delta_helpers import TABLE_ROWS, base_rows, version_copy

# Fixed seed, and no local example database that could make CI's run differ from the last.
PROPERTY = settings(deadline=None, database=None, derandomize=True, max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow])
DISK = settings(PROPERTY, max_examples=20)
WIDTH = 6
NUM_ROWS = 40  # small, so deltas overlap each other and reads hit them often

# A delta: {row: byte value}, the row's new bytes being that value repeated (a dict: rows unique).
deltas_st = st.lists(st.dictionaries(st.integers(0, NUM_ROWS - 1), st.integers(0, 255),
                                     max_size=15), max_size=6)
reads_st = st.lists(st.integers(0, NUM_ROWS - 1), max_size=60)


def as_table_delta(d: dict[int, int], width: int = WIDTH) -> TableDelta:
    rows = np.array(sorted(d), dtype=np.int64)
    return TableDelta(rows, np.array([[d[r]] * width for r in rows], dtype=np.uint8).reshape(-1, width))


def model(base: npt.NDArray[np.uint8], stream: list[dict[int, bytes]], s: int
          ) -> npt.NDArray[np.uint8]:
    """The reference: V's table with deltas 1..s applied, one row at a time."""
    table = {r: bytes(base[r]) for r in range(base.shape[0])}
    for d in stream[:s]:
        table.update(d)
    return np.array([list(table[r]) for r in range(base.shape[0])], dtype=np.uint8)


@PROPERTY
@given(deltas_st, reads_st, st.data())
def test_overlay_is_v_with_deltas_1_to_s_in_order(stream: list[dict[int, int]], reads: list[int],
                                                  data: st.DataObject) -> None:
    base = np.random.default_rng(0).integers(0, 256, (NUM_ROWS, WIDTH), dtype=np.uint8)
    s = data.draw(st.integers(0, len(stream)), label="s")
    want = model(base, [{r: bytes([v] * WIDTH) for r, v in d.items()} for d in stream], s)
    rows = np.array(reads, dtype=np.int64)
    base_read = base[rows].copy()
    got = overlay_rows(base_read, rows, [as_table_delta(d) for d in stream[:s]])
    assert np.array_equal(got, want[rows])
    assert np.array_equal(base_read, base[rows])  # the base rows are never written
    merged = fold([as_table_delta(d) for d in stream[:s]])
    assert np.all(np.diff(merged.rows) > 0)
    # A shard applies only its range's part of each delta and answers the same for its rows.
    cut = data.draw(st.integers(0, NUM_ROWS), label="shard boundary")
    for lo, hi in ((0, cut), (cut, NUM_ROWS)):
        mine = rows[(rows >= lo) & (rows < hi)]
        parts = [as_table_delta(d).within(lo, hi) for d in stream[:s]]
        assert all(p.rows.size == 0 or (p.rows[0] >= lo and p.rows[-1] < hi) for p in parts)
        assert np.array_equal(overlay_rows(base[mine], mine, parts), want[mine])
    assert merged.nbytes == merged.rows.size * (8 + WIDTH) or s == 0
    if s:
        assert np.array_equal(merged.packed, want[merged.rows])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("delta-prop-src")


disk_deltas_st = st.lists(st.dictionaries(st.integers(0, TABLE_ROWS["unified"] - 1),
                                          st.integers(0, 2**31), max_size=30),
                          min_size=1, max_size=5)


def packed_of(seeds: dict[int, int], row_bytes: int) -> TableDelta:
    """Valid INT4 rows (finite fp16 scale/bias), a different one per (row, seed)."""
    rows = np.array(sorted(seeds), dtype=np.int64)
    packed = np.empty((rows.size, row_bytes), dtype=np.uint8)
    for i, r in enumerate(rows):
        rng = np.random.default_rng(seeds[int(r)])
        packed[i, 4:] = rng.integers(0, 256, row_bytes - 4, dtype=np.uint8)
        packed[i, :4] = rng.standard_normal(2).astype(np.float16).view(np.uint8)
    return TableDelta(rows, packed)


@DISK
@given(disk_deltas_st, st.lists(st.integers(0, TABLE_ROWS["unified"] - 1), max_size=200),
       st.data())
def test_written_chain_read_back_at_s_is_v_with_deltas_applied(
        cache: Path, stream: list[dict[int, int]], reads: list[int], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        vdir = version_copy(Path(tmp), cache)
        base = read_manifest(vdir)
        spec = base.table("unified")
        written = [packed_of(d, spec.row_bytes) for d in stream]
        for t in written:
            write_delta_packed(vdir, {"unified": (t.rows, t.packed)})
        s = data.draw(st.integers(0, len(stream)), label="s")
        as_bytes = [{int(r): bytes(p) for r, p in zip(t.rows, t.packed, strict=True)}
                    for t in written]
        want = model(base_rows(vdir, base, "unified"), as_bytes, s)
        chain = read_chain(vdir, s)
        rows = np.array(reads, dtype=np.int64)
        got = overlay_rows(TableReader(vdir, spec).gather(rows), rows,
                           [d.tables["unified"] for d in chain if "unified" in d.tables])
        assert np.array_equal(got, want[rows])
        if s == len(stream) and data.draw(st.booleans(), label="compact"):
            new = compact(vdir, s, f"v1c{s}")
            assert np.array_equal(base_rows(vdir.parent / new.version, new, "unified"), want)
            assert np.array_equal(base_rows(vdir.parent / new.version, new, "cats"),
                                  base_rows(vdir, base, "cats"))


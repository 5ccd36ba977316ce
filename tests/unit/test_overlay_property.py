"""Property: on a shard, a lookup at any readable (V, s) answers V's rows with deltas 1..s
applied, whatever the stream of deltas, the order seqs were made readable, the shard's
range (inside one file or across two) and the read.

In process, on a real mapped tiny version: states are made exactly as the server makes
them (VersionDeltas.base_for, overlay.advance, build_state, VersionDeltas.publish) and
read through the server's own lookup path (lookup.measure / resolve / execute, decoded
from the answer's wire bytes). Expected values come from modelpack.delta_read.overlay_rows
over the version's files (packed), and dequantize_rows then pool in float64 (fp32 outputs).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedding_server.config import ServerConfig
from embedding_server.deltas import VersionDeltas
from embedding_server.lookup import execute, measure, resolve
from embedding_server.overlay import advance, build_state
from embedding_server.table_store import LoadedVersion, open_version, plan_version
from modelpack.delta_read import TableDelta, overlay_rows
from modelpack.int4 import dequantize_rows
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from tests.helpers_store import tiny_version
from tests.unit.delta_helpers import DIM, base_rows, packed_rows

PROPERTY = settings(deadline=None, database=None, derandomize=True, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ROWS = 1000  # tiny/v1's unified table, two files of 500 rows
# Deltas and reads draw from these rows so that they meet often, on both sides of the file
# boundary (500) and of the shard boundaries.
# Also each shard range's bits 63 and 0 of a 64-row word (the signed-word edge).
EDGES = [s + o for s in (0, 333, 500, 666) for o in (63, 64, 127)]
HOT = np.unique(np.concatenate([np.arange(0, 1000, 37), np.arange(490, 510), [0, 999], EDGES]))
SHARDINGS = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]  # (shard, num_shards)

delta_st = st.tuples(st.sets(st.integers(0, HOT.size - 1), min_size=1, max_size=25),
                     st.integers(0, 2**31))  # the rows replaced, a seed for their bytes
read_st = st.tuples(
    st.integers(0, 10**6),  # which readable seq
    st.lists(st.integers(0, 10**6), min_size=0, max_size=40),  # rows (mapped into the range)
    st.sampled_from(["packed", "fp32", "sum", "mean"]),
    st.integers(0, 2**31))  # bag boundaries
step_st = st.tuples(st.integers(0, 10**6), st.lists(read_st, min_size=1, max_size=3))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, npt.NDArray[np.uint8],
                                                               dict[tuple[int, int], LoadedVersion]]:
    store = tmp_path_factory.mktemp("overlay-store")
    tiny_version(store, "v1", seed=3)
    vdir = store / "tiny" / "v1"
    m = read_manifest(vdir)
    loaded = {sh: open_version(plan_version(store, "tiny", "v1", *sh)) for sh in SHARDINGS}
    return vdir, base_rows(vdir, m, "unified"), loaded


def _delta(rows: set[int], seed: int) -> TableDelta:
    r = np.sort(HOT[sorted(rows)]).astype(np.int64)
    return TableDelta(r, packed_rows(np.random.default_rng(seed), r.size))


def _read(vd: VersionDeltas, loaded: LoadedVersion, seq: int, rows: npt.NDArray[np.int64],
          kind: str, offsets: npt.NDArray[np.int64] | None) -> pb.LookupResponse:
    output = pb.OUTPUT_INT4_PACKED if kind == "packed" else pb.OUTPUT_FP32
    pooling = {"sum": pb.POOLING_SUM, "mean": pb.POOLING_MEAN}.get(kind, pb.POOLING_NONE)
    req = pb.LookupRequest(model="tiny", version="v1", id=7, seq=seq, tables=[pb.TableLookup(
        table="unified", rows=rows.astype("<i8").tobytes(), output=output, pooling=pooling,
        offsets=b"" if offsets is None else offsets.astype("<i8").tobytes())])
    cfg = ServerConfig(store=Path("."))
    groups = measure(req, cfg)
    resolve(groups, loaded, vd.readable[seq], cfg)
    return pb.LookupResponse.FromString(execute(groups, loaded, seq, req.id, cfg, None))


def _expected(kind: str, want_packed: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64] | None
              ) -> npt.NDArray[np.float64]:
    values = dequantize_rows(want_packed, DIM).astype(np.float64)
    if offsets is None:
        return values
    sums = np.array([values[a:b].sum(axis=0) for a, b in itertools.pairwise(offsets)]
                    ).reshape(-1, DIM)
    if kind == "mean":
        sums /= np.maximum(np.diff(offsets), 1)[:, None]
    return sums


@PROPERTY
@given(sharding=st.sampled_from(SHARDINGS), keep=st.integers(1, 3),
       deltas=st.lists(delta_st, min_size=1, max_size=5), steps=st.lists(step_st, min_size=1, max_size=5))
@example(sharding=(0, 1), keep=1, deltas=[({0, 1, 2}, 1)],
         steps=[(1, [(0, [0, 1, 2, 3], "mean", 5)]), (0, [(0, [1, 1], "sum", 1)])])
def test_every_read_at_a_readable_seq_is_v_with_deltas_1_to_s(
        world: tuple[Path, npt.NDArray[np.uint8], dict[tuple[int, int], LoadedVersion]],
        sharding: tuple[int, int], keep: int, deltas: list[tuple[set[int], int]],
        steps: list[tuple[int, list[tuple[int, list[int], str, int]]]]) -> None:
    vdir, base, loaded_by = world
    loaded = loaded_by[sharding]
    table = loaded.tables["unified"]
    chain = [{"unified": _delta(rows, seed)} for rows, seed in deltas]  # chain[s - 1] is delta s
    vd = VersionDeltas(vdir, read_manifest(vdir), loaded.tables, keep)
    in_range = HOT[(table.start <= HOT) & (table.stop > HOT)]
    for target, reads in steps:
        seq = target % (len(chain) + 1)
        if seq not in vd.readable:
            start = vd.base_for(seq)
            tables, _ = advance(start, vd.tables, chain[start.seq:seq])
            vd.publish(build_state(seq, f"link{seq}", tables, vd.tables))
        assert seq in vd.readable and len(vd.readable) <= keep
        for pick, raw, kind, cut in reads:
            s = sorted(vd.readable)[pick % len(vd.readable)]
            # Half the rows from the hot set (where deltas land), half anywhere in range.
            picks = np.array(raw, dtype=np.int64)
            rows = np.where(picks % 2 == 0, in_range[picks % max(in_range.size, 1)] if in_range.size
                            else table.start, table.start + picks % (table.stop - table.start))
            offsets = None
            if kind in ("sum", "mean"):
                cuts = np.random.default_rng(cut).integers(0, rows.size + 1, size=3)
                offsets = np.concatenate([[0], np.sort(cuts), [rows.size]]).astype(np.int64)
            resp = _read(vd, loaded, s, rows, kind, offsets)
            assert (resp.seq, resp.id, resp.version) == (s, 7, "v1")
            want = overlay_rows(base[rows], rows, [d["unified"] for d in chain[:s]])
            got = resp.results[0].data
            if kind == "packed":
                assert got == want.tobytes(), (s, rows)
            else:
                values = np.frombuffer(got, np.float32).reshape(-1, DIM).astype(np.float64)
                exp = _expected(kind, want, offsets)
                assert values.shape == exp.shape
                np.testing.assert_allclose(values, exp, rtol=1e-5, atol=1e-4)

"""Deltas: write, read back, and every refusal of the writer and the verifier, by message."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpack import delta_write
from modelpack.delta import DELTA_MANIFEST, DeltaError, check_seq, delta_dir, deltas_dir
from modelpack.delta_read import good_prefix, list_seqs, read_chain, read_delta, verify_chain, verify_delta
from modelpack.delta_write import next_seq, write_delta, write_delta_packed
from modelpack.int4 import quantize_rows
from modelpack.manifest import read_manifest
from tests.unit.delta_helpers import ROW_BYTES, Arrays, forge, packed_rows, update, version_copy


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("delta-src")


@pytest.fixture
def vdir(tmp_path: Path, cache: Path) -> Path:
    return version_copy(tmp_path / "store", cache)


def chain(vdir: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        write_delta(vdir, {"unified": update(rng), "cats": update(rng, "cats", 3)})


def test_round_trip_is_the_quantized_rows_sorted(vdir: Path) -> None:
    rng = np.random.default_rng(1)
    rows, values = update(rng, n=50)
    m = write_delta(vdir, {"unified": (rows, values)}, provenance={"step": 7})
    base = read_manifest(vdir)
    assert (m.seq, m.base_fingerprint, m.prev_fingerprint) == (1, base.fingerprint, base.fingerprint)
    assert m.dense.state == "frozen" and m.dense.sha256 == base.file("dense.safetensors").sha256
    d = read_delta(vdir, 1)
    assert d.manifest == m and m.provenance == {"step": 7} and set(d.tables) == {"unified"}
    order = np.argsort(rows)
    t = d.tables["unified"]
    assert np.array_equal(t.rows, rows[order])
    assert np.array_equal(t.packed, quantize_rows(values)[order])  # V's own quantizer
    assert t.packed.shape == (50, ROW_BYTES)
    # The file holds the manifest's canonical body: stable order, fingerprint last.
    raw = json.loads((delta_dir(vdir, 1) / DELTA_MANIFEST).read_text())
    assert list(raw)[:7] == ["format", "format_version", "model", "version", "base_fingerprint",
                             "seq", "prev_fingerprint"] and list(raw)[-1] == "fingerprint"


def test_chain_links_each_delta_to_the_one_before(vdir: Path) -> None:
    chain(vdir, 3)
    ms = verify_chain(vdir)
    assert [m.seq for m in ms] == [1, 2, 3] == list_seqs(vdir)
    assert [m.prev_fingerprint for m in ms[1:]] == [m.fingerprint for m in ms[:2]]
    assert len(read_chain(vdir, 2)) == 2 and read_chain(vdir, 0) == []
    assert next_seq(vdir) == 4


def test_packed_writer_and_empty_tables(vdir: Path) -> None:
    rng = np.random.default_rng(2)
    m = write_delta_packed(vdir, {"unified": ([5, 1, 3], packed_rows(rng, 3)),
                                  "cats": (np.empty(0, np.int64), packed_rows(rng, 0))})
    assert [(t.name, t.rows) for t in m.tables] == [("unified", 3)]
    assert read_delta(vdir, 1).tables["unified"].rows.tolist() == [1, 3, 5]
    assert write_delta_packed(vdir, {}).tables == ()  # a no-op delta still advances the chain
    assert verify_chain(vdir)[-1].seq == 2


@pytest.mark.parametrize(("updates", "message"), [
    ({"nope": ([1], np.zeros((1, 16), np.float32))}, "has no table 'nope'"),
    ({"../x": ([1], np.zeros((1, 16), np.float32))}, "invalid table name"),
    ({"unified": ([1, 1], np.zeros((2, 16), np.float32))}, "duplicated (row 1 after 1)"),
    ({"unified": ([1000], np.zeros((1, 16), np.float32))}, "row 1000 is outside the table's 1000"),
    ({"unified": ([-1], np.zeros((1, 16), np.float32))}, "row -1 is outside"),
    ({"unified": ([1.5], np.zeros((1, 16), np.float32))}, "1-D integer array"),
    ({"unified": ([1], np.zeros((1, 8), np.float32))}, "shape (1, 16), got float32 (1, 8)"),
    ({"unified": ([4, 9], np.array([[0.0] * 16, [np.nan] * 16], np.float32))},
     "row 9 holds NaN or Inf"),
    ({"unified": ([4], np.full((1, 16), 1e6, np.float32))}, "beyond fp16's range"),
])
def test_writer_refuses_bad_updates(vdir: Path, updates: dict[str, Any], message: str) -> None:
    with pytest.raises(DeltaError) as e:
        write_delta(vdir, updates)
    assert message in str(e.value) and "tiny/v1" in str(e.value)
    assert not deltas_dir(vdir).exists() or list_seqs(vdir) == []


def test_writer_refuses_wrong_packed_width_and_seq(vdir: Path) -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(DeltaError, match=r"shape \(2, 12\), got uint8 \(2, 20\)"):
        write_delta_packed(vdir, {"unified": ([1, 2], np.zeros((2, 20), np.uint8))})
    bad_scale = packed_rows(rng, 2)
    bad_scale[1, 0:2] = np.array([np.inf], np.float16).view(np.uint8)
    with pytest.raises(DeltaError, match="row 8 has a NaN or Inf fp16 scale/bias"):
        write_delta_packed(vdir, {"unified": ([2, 8], bad_scale)})
    with pytest.raises(DeltaError, match="delta 2: is not the next one \\(that is 1\\)"):
        write_delta(vdir, {"unified": update(rng)}, seq=2)
    write_delta(vdir, {"unified": update(rng)}, seq=1)
    with pytest.raises(DeltaError, match="delta 1: already exists"):
        write_delta(vdir, {"unified": update(rng)}, seq=1)
    for bad in (0, -1, True, "2"):
        with pytest.raises(DeltaError, match="must be an integer"):
            write_delta(vdir, {}, seq=bad)  # type: ignore[arg-type]
    assert list_seqs(vdir) == [1]


@pytest.mark.parametrize("bad", [0, -3, True, "1", "../1", 1.0, None])
def test_seq_from_outside_is_checked_before_any_path(bad: object) -> None:
    with pytest.raises(DeltaError, match="must be an integer"):
        check_seq(bad)
    with pytest.raises(DeltaError):
        delta_dir(Path("/nonexistent"), bad)  # type: ignore[arg-type]


def test_list_ignores_temp_and_foreign_names(vdir: Path) -> None:
    chain(vdir, 1)
    for junk in (".tmp-2-abcd", "02", "x", "0"):
        (deltas_dir(vdir) / junk).mkdir()
    assert list_seqs(vdir) == [1] and next_seq(vdir) == 2


def _flip(path: Path, at: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _sorted_rows(f: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                 ) -> Callable[[Arrays], Arrays]:
    return lambda a: {**a, "unified": f(*a["unified"])}


def _nan_bias(r: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = p.copy()
    p[3, 2:4] = np.array([np.nan], np.float16).view(np.uint8)
    return r, p


# (what was done to delta 2 of a 3-delta chain, the refusal's words)
TAMPERING: list[tuple[str, Callable[[Path], None], str]] = [
    ("flipped data byte", lambda v: _flip(delta_dir(v, 2) / "tables/unified/rows.int4"),
     "file tables/unified/rows.int4 sha256"),
    ("flipped row byte", lambda v: _flip(delta_dir(v, 2) / "tables/cats/rows.i64", 0),
     "file tables/cats/rows.i64 sha256"),
    ("truncated file", lambda v: (delta_dir(v, 2) / "tables/unified/rows.int4").write_bytes(b"x"),
     "has 1 bytes, manifest says 240"),
    ("missing file", lambda v: (delta_dir(v, 2) / "tables/unified/rows.int4").unlink(),
     "file tables/unified/rows.int4 is missing"),
    ("missing manifest", lambda v: (delta_dir(v, 2) / DELTA_MANIFEST).unlink(),
     "manifest.json is missing"),
    ("edited manifest", lambda v: (delta_dir(v, 2) / DELTA_MANIFEST).write_text(
        (delta_dir(v, 2) / DELTA_MANIFEST).read_text().replace('"rows": 20', '"rows": 19')),
     "the manifest was edited"),
    ("not json", lambda v: (delta_dir(v, 2) / DELTA_MANIFEST).write_text("{"),
     "manifest is not valid JSON"),
    ("row outside", lambda v: forge(v, 2, arrays=_sorted_rows(
        lambda r, p: (np.append(r[1:], 1000), p))), "row 1000 is outside the table's 1000 rows"),
    ("unsorted rows", lambda v: forge(v, 2, arrays=_sorted_rows(lambda r, p: (r[::-1], p))),
     "rows are not sorted"),
    ("duplicated rows", lambda v: forge(v, 2, arrays=_sorted_rows(
        lambda r, p: (np.sort(np.append(r[1:], r[-1])), p))), "rows are duplicated"),
    ("nan bias", lambda v: forge(v, 2, arrays=_sorted_rows(_nan_bias)),
     "has a NaN or Inf fp16 scale/bias"),
    ("wrong width", lambda v: forge(v, 2, arrays=_sorted_rows(
        lambda r, p: (r, np.pad(p, ((0, 0), (0, 4)))))), "rows are 16 bytes wide, v1's are 12"),
    ("unknown table", lambda v: forge(v, 2, manifest=lambda m: _rename_table(m, "cats", "dogs")),
     "v1 has no table 'dogs'"),
    ("dense not frozen", lambda v: forge(v, 2, manifest=lambda m: m["dense"].update(sha256="0" * 64)),
     "does not declare the dense weights frozen at v1"),
    ("dense state", lambda v: forge(v, 2, manifest=lambda m: m["dense"].update(state="trained")),
     "does not declare the dense weights frozen"),
    ("broken link", lambda v: forge(v, 2, manifest=lambda m: m.update(prev_fingerprint="sha256:0")),
     "follows sha256:0, but delta 1's fingerprint is"),
    ("other version", lambda v: forge(v, 2, manifest=lambda m: m.update(version="v2")),
     "belongs to tiny/v2, not tiny/v1"),
    ("other build", lambda v: forge(v, 2, manifest=lambda m: m.update(base_fingerprint="sha256:1")),
     "was written for build sha256:1 of tiny/v1"),
    ("wrong format", lambda v: forge(v, 2, manifest=lambda m: m.update(format_version=2)),
     "is not 'modelpack-delta' v1"),
    ("extra file listed", lambda v: forge(v, 2, manifest=lambda m: m["files"].append(
        {"path": "../../x", "bytes": 0, "sha256": "0" * 64})), "are not the tables' files"),
    ("nan in manifest", lambda v: forge(v, 2, manifest=lambda m: m.update(written_at=float("nan"))),
     "manifest holds a NaN or Infinity number"),
    ("not a directory", lambda v: _replace_by_file(delta_dir(v, 2)), "cannot read its manifest"),
    ("out of order", lambda v: _swap(delta_dir(v, 2), delta_dir(v, 3)),
     "its manifest says seq 3 (out of order"),
    ("gap", lambda v: shutil.rmtree(delta_dir(v, 1)), "delta 1: is missing (a gap in the chain"),
]


def _rename_table(m: dict[str, Any], old: str, new: str) -> None:
    text = json.dumps(m).replace(f"tables/{old}/", f"tables/{new}/").replace(
        f'"name": "{old}"', f'"name": "{new}"')
    m.clear()
    m.update(json.loads(text))


def _replace_by_file(d: Path) -> None:
    shutil.rmtree(d)
    d.write_bytes(b"{}")


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


@pytest.mark.parametrize(("case", "tamper", "message"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_verifier_refuses_tampering_naming_the_delta(vdir: Path, case: str,
                                                     tamper: Callable[[Path], None],
                                                     message: str) -> None:
    chain(vdir, 3)
    tamper(vdir)
    with pytest.raises(DeltaError) as e:
        verify_chain(vdir)
    text = str(e.value)
    assert message in text, text
    assert ("tiny/v1 delta 1" in text) if case == "gap" else ("tiny/v1 delta 2" in text), text
    good, err = good_prefix(vdir)  # where the stream pauses: the last good seq, and why
    assert [m.seq for m in good] == ([] if case == "gap" else [1])
    assert err is not None and str(err) == text


def test_verify_delta_alone_checks_its_link(vdir: Path) -> None:
    chain(vdir, 3)
    with pytest.raises(DeltaError, match="tiny/v1 delta 4: is missing \\(not written\\)"):
        verify_chain(vdir, 4)
    shutil.rmtree(delta_dir(vdir, 2))
    with pytest.raises(DeltaError, match="tiny/v1 delta 3: delta 2 is missing \\(a gap"):
        verify_delta(vdir, 3)
    with pytest.raises(DeltaError, match="tiny/v1 delta 2: directory is missing"):
        verify_delta(vdir, 2)
    with pytest.raises(DeltaError, match="tiny/v1 delta 2: is missing \\(a gap in the chain befo"):
        verify_chain(vdir, 4)


def test_delta_of_another_build_is_refused(tmp_path: Path, cache: Path) -> None:
    a = version_copy(tmp_path / "a", cache)
    b = version_copy(tmp_path / "b", cache, seed=1)  # same name v1, other bytes
    chain(a, 1)
    shutil.copytree(delta_dir(a, 1), delta_dir(b, 1))
    with pytest.raises(DeltaError, match="tiny/v1 delta 1: was written for build sha256:"):
        verify_chain(b)


def _die_mid_write(vdir: Path) -> None:
    calls = [0]
    real = os.fsync

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 3:  # rows and data of one table written, the rest not
            os._exit(9)
        real(fd)

    delta_write.os.fsync = fsync  # type: ignore[assignment]
    write_delta(vdir, {"unified": update(np.random.default_rng(5)),
                       "cats": update(np.random.default_rng(6), "cats", 3)})


def test_killed_writer_leaves_no_delta_and_the_next_write_succeeds(vdir: Path) -> None:
    chain(vdir, 1)
    child = multiprocessing.get_context("fork").Process(target=_die_mid_write, args=(vdir,))
    child.start()
    child.join(30)
    assert child.exitcode == 9
    assert list_seqs(vdir) == [1]  # only its temp directory is left, which nobody reads
    assert [p.name.startswith(".tmp-2-") for p in deltas_dir(vdir).iterdir() if p.name != "1"] == [True]
    assert write_delta(vdir, {"unified": update(np.random.default_rng(7))}).seq == 2
    assert [m.seq for m in verify_chain(vdir)] == [1, 2]


def test_exception_mid_write_removes_the_temp_dir(vdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = delta_write._write_file

    def fail_on_manifest(root: Path, rel: str, data: bytes) -> Any:
        if rel == DELTA_MANIFEST:
            raise OSError("disk full")
        return real(root, rel, data)

    monkeypatch.setattr(delta_write, "_write_file", fail_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        write_delta(vdir, {"unified": update(np.random.default_rng(8))})
    assert list(deltas_dir(vdir).iterdir()) == []
    monkeypatch.undo()
    assert write_delta(vdir, {"unified": update(np.random.default_rng(8))}).seq == 1

"""Compaction (V + deltas 1..s -> a new full version) and `python -m modelpack delta ...`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpack.__main__ import main
from modelpack.delta import DeltaError, delta_dir
from modelpack.delta_compact import check_compaction, compact
from modelpack.delta_read import overlay_rows, read_chain
from modelpack.delta_write import write_delta
from modelpack.manifest import VerifyError, verify
from modelpack.schema import SchemaError
from tests.unit.delta_helpers import TABLE_ROWS, base_rows, update, version_copy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("delta-compact-src")


@pytest.fixture
def vdir(tmp_path: Path, cache: Path) -> Path:
    v = version_copy(tmp_path / "store", cache)
    rng = np.random.default_rng(0)
    for _ in range(3):
        write_delta(v, {"unified": update(rng, n=200), "cats": update(rng, "cats", 5)})
    return v


def test_compaction_is_v_with_the_deltas_applied(vdir: Path) -> None:
    base = verify(vdir)
    new = compact(vdir, 2, "v1c2", drop=("eval.jsonl",), extra_files={"metrics.json": b"{}\n"})
    ndir = vdir.parent / "v1c2"
    assert verify(ndir) == new and new.version == "v1c2" and new.fingerprint != base.fingerprint
    chain = read_chain(vdir, 2)
    for name, rows in TABLE_ROWS.items():
        everything = np.arange(rows, dtype=np.int64)
        want = overlay_rows(base_rows(vdir, base, name), everything,
                            [d.tables[name] for d in chain])
        assert np.array_equal(base_rows(ndir, new, name), want)
        assert not np.array_equal(want, base_rows(vdir, base, name))  # the deltas did change rows
    # Dense frozen: the very same bytes; the same schema and specs; provenance names the chain.
    assert (ndir / "dense.safetensors").read_bytes() == (vdir / "dense.safetensors").read_bytes()
    assert (new.schema, new.tables, new.dense) == (base.schema, base.tables, base.dense)
    assert new.provenance["compacted_from"] == {
        "version": "v1", "fingerprint": base.fingerprint, "upto_seq": 2,
        "delta_fingerprint": chain[-1].manifest.fingerprint}
    assert [f.path for f in new.files][-1:] == ["metrics.json"]
    assert not (ndir / "eval.jsonl").exists() and not (ndir / "deltas").exists()
    # V's extra files are carried over by default.
    other = compact(vdir, 3, "v1c3")
    assert other.file("eval.jsonl") == base.file("eval.jsonl")


def test_check_compaction_catches_a_version_of_another_seq(vdir: Path) -> None:
    compact(vdir, 2, "v1c2")
    check_compaction(vdir.parent / "v1c2", vdir, 2)
    with pytest.raises(DeltaError, match=r"compaction tiny/v1c2 of tiny/v1 \+ deltas 1..3: table "
                                         r"'\w+' row \d+ differs from the overlay"):
        check_compaction(vdir.parent / "v1c2", vdir, 3)


def test_compaction_refusals_leave_nothing_behind(vdir: Path) -> None:
    store = vdir.parent
    with pytest.raises(DeltaError, match="needs a new version name"):
        compact(vdir, 1, "v1")
    with pytest.raises(SchemaError, match="invalid version name"):
        compact(vdir, 1, "../v9")
    with pytest.raises(DeltaError, match="tiny/v1 delta 4: is missing \\(not written\\)"):
        compact(vdir, 4, "v1c4")
    with pytest.raises(DeltaError, match="upto must be an integer"):
        compact(vdir, 0, "v1c0")
    (delta_dir(vdir, 2) / "tables/cats/rows.int4").write_bytes(b"\0" * 60)
    with pytest.raises(DeltaError, match=r"tiny/v1 delta 2: file tables/cats/rows\.int4 sha256"):
        compact(vdir, 3, "v1c3")
    compact(vdir, 1, "v1c1")
    with pytest.raises(FileExistsError):
        compact(vdir, 1, "v1c1")
    shard = vdir / "tables/unified/shard-0-of-2.bin"
    os.chmod(shard, 0o644)
    shard.write_bytes(b"\1" + shard.read_bytes()[1:])
    with pytest.raises(VerifyError, match="corrupt"):
        compact(vdir, 1, "v1cx")
    assert sorted(p.name for p in store.iterdir()) == ["v1", "v1c1"]  # no temp dir left


def test_cli_list_verify_compact(vdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delta", "list", str(vdir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in out] == ["1", "2", "3"] and "205 rows" in out[0]
    assert main(["delta", "verify", str(vdir), "--upto", "2"]) == 0
    assert "2 deltas verified, 410 rows" in capsys.readouterr().out
    assert main(["delta", "compact", str(vdir), "--upto", "3", "--to", "v1c3"]) == 0
    assert "OK tiny/v1c3 sha256:" in capsys.readouterr().out
    shutil.rmtree(delta_dir(vdir, 2))
    assert main(["delta", "verify", str(vdir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tiny/v1 delta 2: is missing (a gap") and "last good: seq 1" in err
    assert main(["delta", "verify", str(vdir), "--upto", "3"]) == 1
    assert "error: tiny/v1 delta 2: is missing (a gap" in capsys.readouterr().err
    assert main(["delta", "list", "--json", str(vdir)]) == 0
    assert [line[:9] for line in capsys.readouterr().out.splitlines()] == ['{"seq": 1', '{"seq": 3']
    with pytest.raises(SystemExit):
        main(["delta", "verify", str(vdir), "--upto", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_cli_as_a_process(vdir: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "modelpack", "delta", "verify", str(vdir)],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "3 deltas verified" in ok.stdout, ok.stderr
    (delta_dir(vdir, 3) / "tables/unified/rows.i64").unlink()
    bad = subprocess.run([sys.executable, "-m", "modelpack", "delta", "verify", str(vdir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    first, last = bad.stderr.strip().splitlines()
    assert first == "error: tiny/v1 delta 3: file tables/unified/rows.i64 is missing"
    assert last.startswith("last good: seq 2 (sha256:")

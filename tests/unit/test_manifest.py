"""Manifest validation, fingerprint, verify, atomic writes and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpack.dense import build_dense
from modelpack.export import export_version, tables_from_torchrec_state_dict
from modelpack.int4 import dequantize_rows, quantize_rows
from modelpack.manifest import VerifyError, read_manifest, verify
from modelpack.schema import SchemaError
from modelpack.scorer import TableReader
from tests.helpers_store import TINY_SCHEMA, dense_config, tiny_version


def _raw(vdir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((vdir / "manifest.json").read_text())


def _write_raw(vdir: Path, raw: dict) -> None:  # type: ignore[type-arg]
    (vdir / "manifest.json").write_text(json.dumps(raw))


def test_export_writes_verifiable_version(tmp_path: Path) -> None:
    m = tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    assert verify(vdir).fingerprint == m.fingerprint
    assert m.fingerprint.startswith("sha256:")
    assert sorted(p.name for p in tmp_path.joinpath("tiny").iterdir()) == ["v1"]  # no temp dirs
    # Shard files hold exactly their row ranges, in TBE row layout.
    t = m.table("unified")
    assert [f.bytes for f in m.files if f.path.startswith("tables/unified")] == [500 * 12, 500 * 12]
    rows = np.array([0, 499, 500, 999])
    got = dequantize_rows(TableReader(vdir, t).gather(rows), t.dim)
    assert got.shape == (4, 16) and np.isfinite(got).all()


def test_fingerprint_changes_with_any_weight(tmp_path: Path) -> None:
    a = tiny_version(tmp_path / "a", seed=1)
    b = tiny_version(tmp_path / "b", seed=2)
    c = tiny_version(tmp_path / "c", seed=1)
    assert a.fingerprint != b.fingerprint
    assert {f.sha256 for f in a.files if f.path.startswith("tables")} == {
        f.sha256 for f in c.files if f.path.startswith("tables")}


@pytest.mark.parametrize("target", ["tables/unified/shard-1-of-2.bin", "tables/cats/shard-0-of-1.bin",
                                    "dense.safetensors", "eval.jsonl", "manifest.json"])
def test_verify_catches_one_flipped_byte_anywhere(tmp_path: Path, target: str) -> None:
    tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    p = vdir / target
    data = bytearray(p.read_bytes())
    pos = len(data) // 2
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises((VerifyError, SchemaError)):
        verify(vdir)


def test_verify_names_missing_and_truncated_files(tmp_path: Path) -> None:
    tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    (vdir / "eval.jsonl").unlink()
    with pytest.raises(VerifyError, match=r"eval\.jsonl is missing"):
        verify(vdir)
    tiny_version(tmp_path, "v2")
    shard = tmp_path / "tiny" / "v2" / "tables/cats/shard-0-of-1.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(VerifyError, match=r"shard-0-of-1\.bin has .* bytes"):
        verify(tmp_path / "tiny" / "v2")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(version="../x"), "invalid version name"),
    (lambda r: r.update(model="/abs"), "invalid model name"),
    (lambda r: r["files"][0].update(path="/etc/passwd"), "must be relative"),
    (lambda r: r["files"][0].update(path="tables/../../x"), "must not contain"),
    (lambda r: r["dense"].update(path="../dense.safetensors"), "must not contain"),
    (lambda r: r["tables"][0].update(dim=15), "even"),
    (lambda r: r["tables"][0].update(rows="10"), "tables\\[0\\].rows has wrong type"),
    (lambda r: r.pop("features"), "missing field 'features'"),
    (lambda r: r["features"]["sparse"][0].update(table="nope"), "unknown table 'nope'"),
    (lambda r: r["features"]["sparse"][0].update(side="server"), "side must be"),
    (lambda r: r.update(format_version=99), "unsupported format_version"),
    (lambda r: r["files"][0].update(bytes=7), "should hold"),
    (lambda r: r["files"].pop(0), "required file"),
])
def test_malformed_manifests_are_refused(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    raw = _raw(vdir)
    mutate(raw)
    _write_raw(vdir, raw)
    with pytest.raises(SchemaError, match=message):
        read_manifest(vdir)


def test_tampered_body_fails_fingerprint(tmp_path: Path) -> None:
    tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    raw = _raw(vdir)
    raw["provenance"]["seed"] = 99
    _write_raw(vdir, raw)
    with pytest.raises(VerifyError, match="fingerprint"):
        read_manifest(vdir)


def test_not_json_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(SchemaError, match="not valid JSON"):
        read_manifest(tmp_path)


def _export(tmp_path: Path, table: np.ndarray, version: str = "v1") -> None:
    cfg = dense_config(16)
    export_version(tmp_path, "tiny", version, schema=TINY_SCHEMA,
                   tables={"unified": table, "cats": np.zeros((37, 16), np.float32)},
                   num_shards=2, dense=build_dense("dcn_v2", cfg), architecture="dcn_v2",
                   config=cfg, progress=False)


def test_nan_weight_refused_naming_table_and_row_nothing_left(tmp_path: Path) -> None:
    table = np.zeros((300_000, 16), np.float32)
    table[290_001, 3] = np.nan  # in the second streamed block
    with pytest.raises(ValueError, match=r"table 'unified'.*row 290001 holds NaN"):
        _export(tmp_path, table)
    assert list((tmp_path / "tiny").iterdir()) == []  # no partial version directory


def test_nan_dense_weight_refused(tmp_path: Path) -> None:
    cfg = dense_config(16)
    dense = build_dense("dcn_v2", cfg)
    with torch.no_grad():
        next(iter(dense.parameters())).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"dense model: weight .* NaN or Inf"):
        export_version(tmp_path, "tiny", "v1", schema=TINY_SCHEMA,
                       tables={"unified": np.zeros((10, 16), np.float32),
                               "cats": np.zeros((3, 16), np.float32)},
                       num_shards=1, dense=dense, architecture="dcn_v2", config=cfg, progress=False)
    assert list((tmp_path / "tiny").iterdir()) == []


def test_odd_dim_and_missing_table_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="even"):
        _export(tmp_path, np.zeros((10, 15), np.float32))
    cfg = dense_config(16)
    with pytest.raises(ValueError, match=r"tables \['cats'\] that were not given"):
        export_version(tmp_path, "tiny", "v1", schema=TINY_SCHEMA,
                       tables={"unified": np.zeros((10, 16), np.float32)}, num_shards=1,
                       dense=build_dense("dcn_v2", cfg), architecture="dcn_v2", config=cfg,
                       progress=False)


def test_existing_version_is_not_overwritten_by_default(tmp_path: Path) -> None:
    m = tiny_version(tmp_path)
    with pytest.raises(FileExistsError):
        tiny_version(tmp_path)
    assert verify(tmp_path / "tiny" / "v1").fingerprint == m.fingerprint


def test_export_from_torch_modules_and_torchrec_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bag = torch.nn.EmbeddingBag(1000, 16)
    emb = torch.nn.Embedding(37, 16)
    cfg = dense_config(16)
    dense = build_dense("dcn_v2", cfg)
    m1 = export_version(tmp_path, "tiny", "mods", schema=TINY_SCHEMA,
                        tables={"unified": bag, "cats": emb}, num_shards=2, dense=dense,
                        architecture="dcn_v2", config=cfg, progress=False)
    state = {"embedding_bags.unified.weight": bag.weight.detach().clone(),
             "embedding_bags.cats.weight": emb.weight.detach().clone(), "other.bias": torch.zeros(1)}
    tables = tables_from_torchrec_state_dict(state)
    assert sorted(tables) == ["cats", "unified"]
    m2 = export_version(tmp_path, "tiny", "trec", schema=TINY_SCHEMA, tables=tables,
                        num_shards=2, dense=dense, architecture="dcn_v2", config=cfg,
                        progress=False)
    shas = lambda m: [f.sha256 for f in m.files if f.path.startswith("tables")]  # noqa: E731
    assert shas(m1) == shas(m2)
    got = dequantize_rows(TableReader(tmp_path / "tiny" / "mods", m1.table("unified")).gather(
        np.arange(1000)), 16)
    want = dequantize_rows(quantize_rows(bag.weight.detach().numpy()), 16)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="embedding_bags"):
        tables_from_torchrec_state_dict({"foo.weight": torch.zeros(2, 2)})

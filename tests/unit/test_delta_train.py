"""The demo delta trainer: deltas every N examples, dense frozen, the chain continued."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpack.__main__ import main
from modelpack.delta_read import read_chain, verify_chain
from modelpack.delta_train import delta_train, served_tables
from modelpack.delta_train_size import DeltaTrainSize
from modelpack.demo import DemoSize, build_demo_store
from modelpack.int4 import dequantize_rows, quantize_rows
from modelpack.manifest import read_manifest, verify


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("delta-train")
    build_demo_store(root, DemoSize(rows=4000, requests=150, eval_requests=30), progress=False)
    return root


def test_deltas_every_n_examples_against_the_frozen_dense(store: Path) -> None:
    v1 = store / "ads_ctr" / "v1"
    base = read_manifest(v1)
    dense_before = (v1 / "dense.safetensors").read_bytes()
    start = served_tables(v1, base)
    ms = delta_train(v1, DeltaTrainSize(examples=3000, every=1000, batch_size=1024))
    assert [m.seq for m in ms] == [1, 2, 3] and verify_chain(v1) == ms
    assert [m.provenance["examples"] for m in ms] == [1024, 2048, 3008]
    assert all(m.dense.sha256 == base.file("dense.safetensors").sha256 for m in ms)
    assert (v1 / "dense.safetensors").read_bytes() == dense_before and verify(v1) == base
    # Each delta holds the rows its steps touched, trained away from what was served.
    chain = read_chain(v1)
    first = chain[0].tables["unified"]
    assert 100 < first.rows.size < 4000
    old = quantize_rows(start["unified"][first.rows])
    assert (first.packed != old).any(axis=1).mean() > 0.5
    after = served_tables(v1, base)
    untouched = np.setdiff1d(np.arange(4000), np.concatenate([d.tables["unified"].rows
                                                              for d in chain]))
    assert np.array_equal(after["unified"][untouched], start["unified"][untouched])
    assert np.allclose(dequantize_rows(chain[-1].tables["unified"].packed, 32),
                       after["unified"][chain[-1].tables["unified"].rows])


def test_cli_continues_the_chain_and_reports_served_auc(store: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    v1 = store / "ads_ctr" / "v1"
    have = len(verify_chain(v1))
    eval_file = store / "ads_ctr" / "v2" / "eval.jsonl"
    assert main(["delta-train", str(v1), "--examples", "1500", "--every", "1000",
                 "--eval", str(eval_file)]) == 0
    out = capsys.readouterr().out
    assert f"served AUC on {eval_file} at seq {have} -> {have + 2}: 0." in out
    assert [m.seq for m in verify_chain(v1)][-2:] == [have + 1, have + 2]
    assert main(["delta-train", str(v1), "--examples", "0"]) == 1
    assert "examples, every and batch_size must be >= 1" in capsys.readouterr().err

"""`python -m modelpack demo` as a user runs it: a real store, its eval data and its metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelpack.manifest import verify
from modelpack.requests import decode_request
from modelpack.scorer import OfflineScorer
from modelpack.train import auc

ARGS = ["--rows", "4000", "--examples", "8000", "--eval-requests", "60", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "store"
    out = subprocess.run([sys.executable, "-m", "modelpack", "demo", "--store", str(root), *ARGS],
                         capture_output=True, text=True, timeout=600, check=True)
    assert "ads_ctr/v1" in out.stdout and "ads_ctr/v2" in out.stdout
    assert "silent mismatch" in out.stdout
    return root


def test_versions_verify_and_differ(store: Path) -> None:
    m1, m2 = verify(store / "ads_ctr" / "v1"), verify(store / "ads_ctr" / "v2")
    assert m1.fingerprint != m2.fingerprint
    assert m2.provenance["parent_version"] == "v1"
    assert m1.table("unified").rows == 4000 and m1.table("unified").num_shards == 2
    assert any(f.multi_valued and f.pooling == "mean" for f in m1.schema.sparse)
    assert {f.hash_seed for f in m1.schema.sparse} == {f.hash_seed for f in m2.schema.sparse}
    assert len({f.hash_seed for f in m1.schema.sparse}) == len(m1.schema.sparse)


def test_eval_jsonl_is_rank_requests_and_metrics_match_int4_files(store: Path) -> None:
    for version in ("v1", "v2"):
        vdir = store / "ads_ctr" / version
        reqs = [json.loads(line) for line in (vdir / "eval.jsonl").read_text().splitlines()]
        assert len(reqs) == 60
        scorer = OfflineScorer(vdir)
        for r in reqs[:5]:
            d = decode_request(scorer.schema, r)  # the ranker's own decoder accepts it
            assert d.num_candidates == len(r["labels"]) == len(r["candidates"])
            assert r["model"] == "ads_ctr" and r["request_id"]
        metrics = json.loads((vdir / "metrics.json").read_text())
        labels = np.concatenate([r["labels"] for r in reqs])
        scores = np.concatenate(scorer.score_all(reqs))
        # metrics.json's INT4 AUC is what the shipped files score, bit for bit.
        assert auc(labels, scores) == pytest.approx(metrics["int4_auc"], abs=2e-5)
        assert 0.5 < metrics["fp32_auc"] < 1.0
    assert "mismatch_auc" in json.loads((store / "ads_ctr" / "v2" / "metrics.json").read_text())


def test_rerun_reuses_and_verifies_existing_store(store: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "modelpack", "demo", "--store", str(store), *ARGS],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "already built" in out.stdout


def test_verify_cli_reports_corruption(store: Path, tmp_path: Path) -> None:
    import shutil

    vdir = tmp_path / "ads_ctr" / "v1"
    shutil.copytree(store / "ads_ctr" / "v1", vdir)
    ok = subprocess.run([sys.executable, "-m", "modelpack", "verify", str(vdir)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("OK ads_ctr/v1 sha256:")
    shard = vdir / "tables" / "unified" / "shard-1-of-2.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x10
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "modelpack", "verify", str(vdir)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "shard-1-of-2.bin sha256" in bad.stderr and "corrupt" in bad.stderr

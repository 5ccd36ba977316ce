"""The benchmark drivers run and say true things: P5 on the ranker's own pipeline, --help of each.

P5 (`python -m loadtest.bench.gpu --device cpu`) runs for a few seconds on a small demo
store; its JSON must hold scores that modelpack's offline scorer reproduces, positive
step results, per-stage costs and the shared result record's fields, so the driver
cannot drift away from the server's pipeline again.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from loadtest.bench import gpu
from loadtest.bench.workload import build_requests
from modelpack.demo import DemoSize, build_demo_store
from modelpack.scorer import OfflineScorer

DRIVERS = ("gpu", "embedding", "scale", "hybrid_tax", "serving_tax")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-store")
    build_demo_store(root, DemoSize(rows=4000, requests=300, eval_requests=40), progress=False)
    return root


def run_driver(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"loadtest.bench.{name}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def p5(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("p5") / "p5.json"
    proc = run_driver("gpu", "--device", "cpu", "--store", str(store), "--requests", "24",
                      "--saturation-s", "0.7", "--step-s", "0.7", "--fractions", "0.3,0.6",
                      "--stage-repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 10_000
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_p5_scores_match_the_offline_scorer(p5: dict[str, Any], store: Path) -> None:
    vdir = store / "ads_ctr" / "v1"
    parity = p5["results"]["parity"]
    first = parity["first_request"]
    request = build_requests(vdir / "eval.jsonl", 8, p5["config"]["candidates"])[0]
    assert first["request_id"] == request["request_id"]
    want = OfflineScorer(vdir).score(request)
    got = np.asarray(first["scores"], dtype=np.float32)
    assert got.shape == want.shape == (200,)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert parity["max_abs_diff_vs_offline_scorer"] <= 2e-3
    assert float(got.std()) > 0  # not a constant answer


def test_p5_steps_and_stages_are_measured(p5: dict[str, Any]) -> None:
    steps = p5["results"]["steps"]
    assert [s["mode"] for s in steps] == ["saturation", "open", "open"]
    for s in steps:
        assert s["requests"] > 0 and s["candidates"] == s["requests"] * 200
        assert s["candidates_per_s"] > 0 and s["wall_s"] > 0
        assert 0 < s["p50_ms"] <= s["p99_ms"]
        assert 200 <= s["mean_batch_candidates"] <= p5["config"]["max_batch_candidates"]
    sat, low = steps[0], steps[1]
    assert low["offered_requests_per_s"] == pytest.approx(0.3 * sat["requests"] / sat["wall_s"])
    assert sat["mean_batch_candidates"] > low["mean_batch_candidates"]  # a backlog fills batches
    for label, costs in p5["results"]["stage_costs_serial"].items():
        assert set(costs["min_us"]) == {"decode", "merge_plan", "lookup", "stage", "forward",
                                        "respond"}, label
        assert all(v > 0 for v in costs["min_us"].values())
    under_load = p5["results"]["stage_us_per_request_saturated"]
    assert under_load["forward_duration"] > 0 and under_load["lookup_duration"] > 0
    assert p5["verdict"]["saturation_candidates_per_s"] == sat["candidates_per_s"]


def test_p5_writes_the_shared_record(p5: dict[str, Any]) -> None:
    assert p5["benchmark"].startswith("P5") and p5["device"] == "cpu"
    assert p5["compared"] and p5["anchor"]
    assert p5["host"]["cpus"] >= 1 and len(p5["host"]["loadavg_start"]) == 3
    assert len(p5["host"]["loadavg_end"]) == 3
    assert p5["git_commit"] is None or len(p5["git_commit"].split("+")[0]) == 40
    assert "CPU FALLBACK" in p5["results"]["label"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_p5_without_cuda_skips_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--device", "cuda", "--store", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("name", DRIVERS)
def test_driver_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (an interpreter start per driver would cost more than the test)."""
    main = importlib.import_module(f"loadtest.bench.{name}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert f"usage: python -m loadtest.bench.{name}" in capsys.readouterr().out

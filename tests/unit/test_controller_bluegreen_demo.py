"""The blue/green scenario's timeline (loadtest/stack/bluegreen.py) from given samples:
merged segments per replica, the JSON and the picture."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.stack.bluegreen import BlueGreenRun, Sample, plot_replicas, segments, write_json


def _run() -> BlueGreenRun:
    run = BlueGreenRun([["a", "b"]], started_at=100.0, ended_at=110.0, exit_code=0,
                       steps=[("convert:0", 101.0), ("convert_rest", 106.0)])
    held: dict[str, list[tuple[str, ...]]] = {
        "a": [("v1",), ("v1",), (), ("v2",), ("v2",), ("v2",)],
            "b": [("v1",), ("v1",), ("v1",), ("v1",), ("v2",), ("v2",)]}
    run.samples = [Sample(100.0 + 2 * i, addr, vs) for addr, seq in held.items()
                   for i, vs in enumerate(seq)]
    return run


def test_segments_merge_equal_samples_and_mark_converting_replicas() -> None:
    segs = segments(_run())
    assert segs["a"] == [(0.0, 4.0, "v1"), (4.0, 6.0, "-"), (6.0, 10.0, "v2")]
    assert segs["b"] == [(0.0, 8.0, "v1"), (8.0, 10.0, "v2")]


def test_json_and_png_are_written(tmp_path: Path) -> None:
    run = _run()
    doc = json.loads(write_json(run, tmp_path / "bg.json").read_text())
    assert doc["segments"]["a"][1] == [4.0, 6.0, "-"] and doc["exit_code"] == 0
    png = plot_replicas(run, tmp_path / "replicas.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

"""The one result record every benchmark writes: JSON beside a PNG from bench/plotting.py.

    rec = BenchRecord("P5 ranker pipeline", compared="...", anchor="...", device="cpu",
                      config=vars(args))
    ...measure...
    rec.verdict = {...}; rec.results = {...}
    rec.write(RESULTS / "gpu_p5_cpu.json", panels, title="P5 ...")

Modelled on TorchRec's BenchmarkResult: what was compared against what anchor, on which
device and host (cores and load average at both ends: the machines are shared, so only
ratios within one run mean much), at which commit, with which config; then the headline
figures (`verdict`: medians, p99s, ratios vs targets) and everything measured (`results`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.bench.plotting import Panel, save_panels
from loadtest.harness.procfs import loadavg

RESULTS = Path(__file__).resolve().parents[1] / "results"
_REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from ('+dirty' with local changes), or None.

    $BENCH_GIT_COMMIT names it where the tree travelled without its .git (a device machine)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "loadavg_start": loadavg()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _jsonable(v: Any) -> Any:
    """NaN / inf become null: the files stay strict JSON for every reader."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


@dataclass
class BenchRecord:
    """One benchmark run; see the module docstring."""

    name: str
    compared: str  # what is measured, e.g. "ranker with remote shards vs --local-tables"
    anchor: str  # the reference the ratios divide by
    device: str
    config: dict[str, Any]
    verdict: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=host_info)
    git: str | None = field(default_factory=git_commit)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    argv: list[str] = field(default_factory=lambda: sys.argv[1:])
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"benchmark": self.name, "compared": self.compared, "anchor": self.anchor,
                "device": self.device, "created": self.created, "git_commit": self.git,
                "argv": self.argv, "host": self.host, "config": self.config,
                "duration_s": round(time.monotonic() - self._t0, 2),
                "verdict": self.verdict, "results": self.results}

    def write(self, path: Path, panels: Sequence[Panel] = (), *, title: str = "",
              note: str = "") -> Path:
        """Write the JSON to `path` and, given panels, the PNG beside it; returns the JSON path."""
        self.host["loadavg_end"] = loadavg()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(self.as_dict()), indent=1) + "\n")
        if panels:
            load = f"loadavg start {self.host['loadavg_start']} end {self.host['loadavg_end']}"
            save_panels(path.with_suffix(".png"), title or self.name, panels,
                        note=f"{note}  {load}; commit {(self.git or '?')[:12]}".strip())
        return path

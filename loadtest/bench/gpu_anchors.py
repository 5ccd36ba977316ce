"""P5's anchors on the device, measured in the same run as the servers: the bare dense
forward at the ranker's batch sizes, host -> device copy bandwidth (pinned and pageable),
and a GPU utilization sampler (NVML) to run beside a load step.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpack.dense import load_dense
from modelpack.manifest import read_manifest


def device_info() -> dict[str, Any]:
    """GPU model, driver, CUDA and torch versions (the labels every P5 figure carries)."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                multiprocessors=props.multi_processor_count)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,pcie.link.gen.max,"
                              "pcie.link.width.max", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        driver, gen, width = (x.strip() for x in out.splitlines()[0].split(","))
        info.update(driver=driver, pcie=f"gen{gen} x{width}")
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        info["driver"] = f"unknown ({e})"
    return info


def _timed_ms(fn: Any, reps: int) -> list[float]:
    """Device milliseconds of `fn()` per call, each timed with CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def raw_forward(vdir: Path, batches: list[int], reps: int = 30) -> list[dict[str, Any]]:
    """The dense model alone on the GPU (inputs already there, scores to the host included,
    as the ranker returns them): median and p99 ms and candidates/s per batch size."""
    m = read_manifest(vdir)
    cfg = m.dense.config
    model = load_dense(vdir / m.dense.path, m.dense.architecture, cfg).eval().cuda()
    out = []
    for b in batches:
        g = torch.Generator(device="cuda").manual_seed(0)
        sparse = torch.randn((b, int(cfg["num_sparse"]), int(cfg["embedding_dim"])),  # type: ignore[call-overload]
                             device="cuda", generator=g)
        dense = torch.randn((b, int(cfg["num_dense"])), device="cuda", generator=g)  # type: ignore[call-overload]

        def step(sparse: torch.Tensor = sparse, dense: torch.Tensor = dense) -> None:
            with torch.inference_mode():
                torch.sigmoid(model(sparse, dense)).cpu()

        # Wall clock, not events: .cpu() synchronizes, and the host's launch cost counts.
        for _ in range(3):
            step()
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            t.append(time.perf_counter() - t0)
        med, p99 = np.percentile(t, [50, 99])
        out.append({"batch": b, "median_ms": float(med * 1e3), "p99_ms": float(p99 * 1e3),
                    "candidates_per_s": b / float(med)})
    return out


def h2d_bandwidth(sizes_mb: tuple[int, ...] = (1, 16, 256), reps: int = 10) -> list[dict[str, Any]]:
    """GB/s of host -> device copies from pinned and from pageable memory (median)."""
    out = []
    for mb in sizes_mb:
        n = mb << 20
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        for kind in ("pinned", "pageable"):
            src = torch.empty(n, dtype=torch.uint8, pin_memory=(kind == "pinned"))
            ms = float(np.median(_timed_ms(lambda s=src, d=dst: d.copy_(s, non_blocking=True), reps)))
            out.append({"MB": mb, "memory": kind, "median_ms": ms, "GB_per_s": n / ms / 1e6})
    return out


class UtilSampler:
    """GPU and memory-controller utilization (NVML) every `period_s`, in a thread."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, int, int]] = []  # (time.time(), gpu %, memory %)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> UtilSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception as e:  # no NVML: no utilization, said so in the result
            self.error = f"{type(e).__name__}: {e}"
            return self
        self._thread = threading.Thread(target=self._run, name="gpu-util", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            u = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append((time.time(), int(u.gpu), int(u.memory)))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        """Mean GPU and memory utilization (%) of the samples taken in [t0, t1]."""
        sel = [(g, m) for t, g, m in self.samples if t0 <= t <= t1]
        if not sel:
            return {"gpu_util_pct": None, "mem_util_pct": None, "samples": 0,
                    **({"error": self.error} if self.error else {})}
        a = np.asarray(sel, dtype=np.float64)
        return {"gpu_util_pct": float(a[:, 0].mean()), "mem_util_pct": float(a[:, 1].mean()),
                "samples": len(sel)}

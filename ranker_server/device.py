"""The one place that owns the compute device: placement, host staging and device threads.

All device work runs on two dedicated threads owned here: `stage` (host -> device copies
of the next batch's inputs) and `compute` (dequantize, pool, dense forward). Keeping
them off the event loop lets the loop keep firing lookups and answering requests while
the device is busy, and two threads let batch k+1's inputs be staged while batch k runs.
On CUDA host arrays go through pinned buffers with non-blocking copies; on the CPU the
same calls are zero-copy views, so both paths run the same code and give the same scores.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from ranker_server.config import ConfigError, DeviceKind

log = logging.getLogger(__name__)
T = TypeVar("T")
# A CUDA error (an illegal access, a failed launch) poisons the context for good: every
# later batch fails. These say so in the RuntimeError's text.
_FATAL_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cudaError",
                        "illegal memory access", "device-side assert")


def resolve_device(kind: DeviceKind) -> torch.device:
    """auto -> cuda when available else cpu; asking for cuda without one is a config error."""
    if kind == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if kind == "cuda":
        raise ConfigError("device: cuda requested but torch sees no CUDA device")
    return torch.device("cpu")


class Device:
    """A torch device plus the threads that may touch it."""

    def __init__(self, kind: DeviceKind) -> None:
        self.torch_device = resolve_device(kind)
        self.is_cuda = self.torch_device.type == "cuda"
        self._stage = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker-stage")
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker-compute")
        self.broken: str | None = None
        """Set once a device error poisoned the context: the ranker is then not ready."""
        name = torch.cuda.get_device_name(self.torch_device) if self.is_cuda else "cpu"
        log.info("ranker device: %s (%s)", self.torch_device, name)

    async def stage(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the staging thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._stage, functools.partial(fn, *args))

    async def compute(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` on the compute thread (device work is serialized there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, functools.partial(fn, *args))

    def guard(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the compute thread; a device error marks the device broken (logged
        once), so readiness fails instead of every later batch failing behind a green probe."""
        if self.broken is not None:
            raise RuntimeError(f"device unusable since an earlier error: {self.broken}")
        try:
            return fn(*args)
        except RuntimeError as e:
            if any(m in str(e) for m in _FATAL_DEVICE_ERRORS):
                self.broken = str(e).splitlines()[0][:300]
                log.error("device %s failed, ranker no longer ready: %s", self.torch_device,
                          self.broken)
            raise

    def to_device(self, array: npt.NDArray[np.generic]) -> torch.Tensor:
        """A host array on the device: pinned buffer + non-blocking copy on CUDA, a view on CPU."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if not self.is_cuda:
            return host
        # The caching host allocator reuses the pinned block only after the copy finishes.
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(self.torch_device, non_blocking=True)

    def place_module(self, module: nn.Module) -> nn.Module:
        """Move a freshly loaded dense model onto the device, in eval mode."""
        return module.to(self.torch_device).eval()

    def release_memory(self) -> None:
        """Give cached device memory back after a version is unloaded (on the compute thread:
        it waits for the device, which would stall the event loop)."""
        if self.is_cuda:
            torch.cuda.empty_cache()

    def close(self) -> None:
        self._stage.shutdown(wait=True)
        self._compute.shutdown(wait=True)

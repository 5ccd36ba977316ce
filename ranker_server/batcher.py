"""Dynamic batching: concurrent requests for the same version become one device batch.

A batch closes when it holds `max_batch_candidates`, when its oldest request has waited
`max_batch_wait_ms`, or (`eager_dispatch`) at once when no batch is running: waiting
would only add latency then, and under load batches fill while others run. Up to
`max_batches_in_flight` batches run at once, so batch k+1's lookups fly while batch k
is on the device. The queue of waiting requests is bounded
(`max_queue`): past it a request is shed with 429 at once instead of waiting without
bound; so is one read while the event loop runs more than `shed_loop_lag_ms` late
(loop_lag.py). A request whose deadline passes while queued fails with 504 and is not scored.

A batch reads its version at one delta seq, pinned when the batch forms (`_take`): an
admin change of the seq applies to batches formed after it, never within one.

From `submit` on, the batcher owns the request's version lease: `_retire` is the one
place a submitted request leaves the batcher, answered or abandoned, and the one place
its lease is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from modelpack.requests import DecodedRequest
from ranker_server.config import RankerConfig
from ranker_server.errors import RankError
from ranker_server.loop_lag import LoopLag
from ranker_server.metrics import Metrics
from ranker_server.pipeline import Pipeline
from ranker_server.versions import Lease

log = logging.getLogger(__name__)
Scores = npt.NDArray[np.float32]


@dataclass(eq=False)
class RankItem:
    """One admitted request on its way through the batcher, which owns its lease."""

    lease: Lease
    request: DecodedRequest
    deadline: float  # time.monotonic() after which the request is answered 504
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = 0  # the delta seq its batch read at, pinned when the batch formed
    future: asyncio.Future[Scores] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    def __init__(self, config: RankerConfig, pipeline: Pipeline, metrics: Metrics) -> None:
        self.max_candidates = config.max_batch_candidates
        self.wait_s = config.max_batch_wait_ms / 1000.0
        self.eager = config.eager_dispatch
        self.max_queue = config.max_queue
        self.max_lag_s = config.shed_loop_lag_ms / 1000.0
        self.lag = LoopLag() if self.max_lag_s > 0 else None
        self.retry_after_s = config.retry_after_s
        self.pipeline = pipeline
        self.metrics = metrics
        self._pending: deque[RankItem] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_batches_in_flight)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="ranker-batcher")
        if self.lag is not None:
            self.lag.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def check_capacity(self) -> None:
        """Raise 429 if a new request could not be queued, or the loop runs too late (cheap;
        call before reading the body)."""
        if len(self._pending) >= self.max_queue:
            raise RankError(429, "overloaded",
                            f"ranker overloaded: {len(self._pending)} requests already queued "
                            f"(max_queue {self.max_queue}); retry later",
                            retry_after_s=self.retry_after_s)
        if self.lag is not None and self.lag.lag_s > self.max_lag_s:
            raise RankError(429, "overloaded",
                            f"ranker overloaded: its event loop runs {self.lag.lag_s * 1000:.0f} "
                            f"ms late (shed_loop_lag_ms {self.max_lag_s * 1000:g}); retry later",
                            retry_after_s=self.retry_after_s)

    def submit(self, lease: Lease, request: DecodedRequest, deadline: float) -> RankItem:
        """Queue a request (429 if full, the lease left to its holder); else the batcher
        takes the lease over, and answers the request through the item's future."""
        self.check_capacity()
        item = RankItem(lease.take(), request, deadline)
        self._pending.append(item)
        self._arrived.set()
        return item

    def _retire(self, item: RankItem, result: Scores | RankError | None) -> None:
        """A submitted request leaves the batcher: answer its caller, if still waiting
        (None: it gave up), and release its lease. Every exit goes through here."""
        if result is not None and not item.future.done():
            if isinstance(result, RankError):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if isinstance(result, RankError):  # the version failures' own counters
            self.metrics.count_failed_request(result.reason)
        item.lease.release()

    async def drain(self, timeout_s: float) -> None:
        """Let queued and running batches finish (up to `timeout_s`), then stop the loop."""
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if self.lag is not None:
            self.lag.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                items = await self._collect()
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception:  # a bug: keep batching rather than hang every request
                log.exception("batcher loop failed; continuing")
                self._slots.release()
                await asyncio.sleep(0.01)
                continue
            task = asyncio.create_task(self._run(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _drop_finished(self) -> None:
        """Fail queued requests whose deadline passed or whose caller gave up."""
        now = time.monotonic()
        keep: deque[RankItem] = deque()
        for it in self._pending:
            if it.future.done():
                self._retire(it, None)
            elif now >= it.deadline:
                waited_ms = (now - it.enqueued) * 1000
                self._retire(it, RankError(504, "deadline", f"deadline expired after {waited_ms:.0f} ms "
                                    "in the queue, before scoring started"))
            else:
                keep.append(it)
        self._pending = keep

    async def _collect(self) -> list[RankItem]:
        while True:
            self._drop_finished()
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            version = self._pending[0].lease.version
            same = [it for it in self._pending if it.lease.version is version]
            total = sum(it.request.num_candidates for it in same)
            flush_at = self._pending[0].enqueued + self.wait_s
            now = time.monotonic()
            # An idle pipeline gains nothing from waiting: batches form while one is running.
            idle = self.eager and not self._running
            if total >= self.max_candidates or now >= flush_at or idle:
                return self._take(same)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), flush_at - now)

    def _take(self, same: list[RankItem]) -> list[RankItem]:
        batch: list[RankItem] = []
        size = 0
        for it in same:
            if batch and size + it.request.num_candidates > self.max_candidates:
                break
            batch.append(it)
            size += it.request.num_candidates
        seq = batch[0].lease.version.seq  # the batch's one seq, read once
        for it in batch:
            it.seq = seq
        taken = set(batch)
        self._pending = deque(it for it in self._pending if it not in taken)
        return batch

    async def _run(self, items: list[RankItem]) -> None:
        outcome: list[Scores] | RankError = RankError(500, "internal", "scoring was cancelled")
        try:
            now = time.monotonic()
            for it in items:
                self.metrics.queue_wait.observe(now - it.enqueued)
            version = items[0].lease.version
            # The lookups serve every request of the batch: bound them by the latest deadline;
            # each caller still answers 504 at its own deadline.
            timeout_s = max(it.deadline for it in items) - now
            outcome = await self.pipeline.run(version, [it.request for it in items], timeout_s,
                                              seq=items[0].seq)
            if len(outcome) != len(items):
                raise AssertionError(f"{len(outcome)} score arrays for {len(items)} requests")
        except RankError as e:
            level = logging.ERROR if e.reason == "version_mismatch" else logging.WARNING
            log.log(level, "batch of %d requests failed: %s", len(items), e.message)
            outcome = e
        except Exception as e:
            log.exception("batch of %d requests failed", len(items))
            outcome = RankError(500, "internal", f"internal error while scoring: {type(e).__name__}")
        finally:
            for i, it in enumerate(items):
                self._retire(it, outcome if isinstance(outcome, RankError) else outcome[i])
            self._slots.release()

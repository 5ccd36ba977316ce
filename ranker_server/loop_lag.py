"""How far behind the event loop runs: the lateness of a timer re-armed every few ms.

A request's bytes wait in the socket until the loop gets round to them, and no queue
bound sees that wait: when the loop is the bottleneck (small requests, or a CPU shared
with neighbours), it grows without bound however short the batcher's queue. A timer
that fires late by L says the loop is L behind, so requests read now have waited about
that long already; shedding them (a 429 costs the loop a fraction of a scored request)
lets it catch up.
"""

from __future__ import annotations

import asyncio


class LoopLag:
    """`lag_s`: how far behind the loop is (one timer every `interval_s`): the lateness of
    the last tick, or an earlier, larger one less the time since (a backlog drains no faster
    than the clock runs), so one stall is seen for as long as it lasted, not one tick."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._due = 0.0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._due = self._last + self.interval_s
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.lag_s = max(0.0, now - self._due, self.lag_s - (now - self._last))
        self._last, self._due = now, now + self.interval_s
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

"""Background tasks: by id (rollouts, delta operations), and periodic loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Tasks(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what  # names them in logs: "rollout", "delta"
        self._tasks: dict[str, asyncio.Task[T]] = {}

    def spawn(self, key: str, coro: Coroutine[Any, Any, T]) -> None:
        task = asyncio.create_task(coro, name=f"{self.what}-{key}")
        self._tasks[key] = task

        def done(t: asyncio.Task[T]) -> None:
            self._tasks.pop(key, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s %s task died: %r", self.what, key, t.exception())

        task.add_done_callback(done)

    async def wait(self, key: str) -> None:
        """Until the task ends (at once if there is none), however it ends."""
        task = self._tasks.get(key)
        if task is not None:
            await asyncio.wait({task})

    def keys(self) -> list[str]:
        return list(self._tasks)

    async def cancel(self) -> None:
        """Cancel every task and wait for them (a cancelled step is an interrupted one)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class Periodic:
    """`fn` every `interval_s` seconds in a task (reconcile passes, delta follow passes);
    a pass that raises is logged, never the end of the loop. interval_s <= 0: never."""

    def __init__(self, name: str, fn: Callable[[], Awaitable[object]], interval_s: float) -> None:
        self.name, self.fn, self.interval_s = name, fn, interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.fn()
            except Exception:  # a bug in one pass must not end the loop for good
                log.exception("%s pass failed", self.name)
            await asyncio.sleep(self.interval_s)

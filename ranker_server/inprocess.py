"""Run the ranker app inside the current event loop, for tests and benchmarks.

    async with serve_in_process(config) as (client, state):
        r = await client.post("/v1/rank", json=request)

No socket and no uvicorn: requests go straight to the ASGI app through httpx's
ASGITransport (httpx is a dev dependency, imported only here), with the app's real
lifespan run around them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import TYPE_CHECKING, Any

from ranker_server.app import RankerState, create_app
from ranker_server.config import RankerConfig

if TYPE_CHECKING:
    import httpx


@contextlib.asynccontextmanager
async def serve_in_process(config: RankerConfig, *, wait_ready: bool = True
                           ) -> AsyncIterator[tuple[httpx.AsyncClient, RankerState]]:
    import asyncio

    import httpx

    states: list[RankerState] = []
    app = create_app(config, state_out=states)
    async with app.router.lifespan_context(app) as lifespan_state:

        async def with_state(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
            # What uvicorn does: hand the lifespan's state to every request.
            await app({**scope, "state": dict(lifespan_state or {})}, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://ranker") as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30.0
            while wait_ready and states[0].registry.active is None:
                if loop.time() > deadline:
                    raise TimeoutError(f"ranker not ready: {states[0].lifecycle.startup_error}")
                await asyncio.sleep(0.01)
            yield client, states[0]

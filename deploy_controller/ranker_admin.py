"""Client of a ranker's HTTP admin API (bearer token), one base URL per call.

Contract (ranker_server): GET/POST /admin/v1/versions, POST .../{v}/prepare (with
?min_replicas=1 in a blue/green rollout: one replica per shard holding v READY is enough),
POST .../{v}/activate, PUT /admin/v1/split, DELETE .../{v}?timeout_s=, GET /metrics,
PUT .../{v}/seq {"seq": s, "fingerprint"?: f} (the delta seq the ranker reads v at).
Errors become FleetError; connection failures, 5xx and 409 (still busy: in-flight
requests, a shard not ready yet) are retryable, other 4xx are not.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from deploy_controller.fleet import FleetError, RankerStatus

_RETRYABLE = {409, 425, 429}


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:300]


class RankerAdmin:
    def __init__(self, token: str, *, timeout_s: float = 120.0) -> None:
        self._client = httpx.AsyncClient(
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=5.0))

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, url: str, path: str, *, json: Any = None,
                    params: dict[str, Any] | None = None, timeout_s: float | None = None
                    ) -> httpx.Response:
        full = url.rstrip("/") + path
        kwargs: dict[str, Any] = {"json": json, "params": params}
        if timeout_s is not None:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=5.0)
        try:
            resp = await self._client.request(method, full, **kwargs)
        except httpx.HTTPError as e:
            raise FleetError(url, f"{method} {path}: {type(e).__name__}: {e}",
                             retryable=True) from None
        if resp.status_code >= 400:
            raise FleetError(
                url, f"{method} {path}: HTTP {resp.status_code}: {_detail(resp)}",
                retryable=resp.status_code >= 500 or resp.status_code in _RETRYABLE,
                status=resp.status_code)
        return resp

    async def status(self, url: str) -> RankerStatus:
        resp = await self._call("GET", url, "/admin/v1/versions")
        try:
            return RankerStatus.from_json(resp.json())
        except (ValueError, KeyError, TypeError) as e:
            raise FleetError(url, f"GET /admin/v1/versions: malformed answer: {e}") from None

    async def load(self, url: str, version: str) -> None:
        await self._call("POST", url, "/admin/v1/versions", json={"version": version})

    async def prepare(self, url: str, version: str, any_replica: bool = False) -> None:
        await self._call("POST", url, f"/admin/v1/versions/{quote(version)}/prepare",
                         params={"min_replicas": 1} if any_replica else None)

    async def activate(self, url: str, version: str) -> None:
        await self._call("POST", url, f"/admin/v1/versions/{quote(version)}/activate")

    async def split(self, url: str, split: dict[str, float]) -> None:
        await self._call("PUT", url, "/admin/v1/split", json={"split": split})

    async def unload(self, url: str, version: str, timeout_s: float) -> None:
        try:
            await self._call("DELETE", url, f"/admin/v1/versions/{quote(version)}",
                             params={"timeout_s": timeout_s}, timeout_s=timeout_s + 10.0)
        except FleetError as e:
            if e.status != 404:  # already gone: unloading is idempotent
                raise

    async def set_seq(self, url: str, version: str, seq: int, fingerprint: str = "") -> None:
        body: dict[str, Any] = {"seq": seq} | ({"fingerprint": fingerprint} if fingerprint else {})
        await self._call("PUT", url, f"/admin/v1/versions/{quote(version)}/seq", json=body)

    async def metrics(self, url: str) -> str:
        resp = await self._call("GET", url, "/metrics", timeout_s=10.0)
        return resp.text

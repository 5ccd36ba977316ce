"""Client of the embedding shards' admin gRPC (protos/embedding.proto), one replica per call.

Each replica address gets its own channel: the controller must reach every replica
by itself (a load balanced channel would load the version on one of them only).
Admin calls carry `authorization: Bearer <token>` metadata.
"""

from __future__ import annotations

import grpc

from deploy_controller.fleet import Fit, FleetError, ShardVersion
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pb_grpc

_STATE = {
    pb.VERSION_STATE_UNSPECIFIED: "unknown",
    pb.VERSION_STATE_LOADING: "loading",
    pb.VERSION_STATE_READY: "ready",
    pb.VERSION_STATE_UNLOADING: "unloading",
    pb.VERSION_STATE_FAILED: "failed",
}
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})
# ApplyDeltas' RESOURCE_EXHAUSTED means "over the memory budget": trying again cannot help.
_APPLY_RETRYABLE = _RETRYABLE - {grpc.StatusCode.RESOURCE_EXHAUSTED}


def _version(v: pb.VersionInfo) -> ShardVersion:
    return ShardVersion(model=v.model, version=v.version, fingerprint=v.fingerprint,
                        state=_STATE.get(v.state, "unknown"), bytes=v.bytes, error=v.error,
                        in_flight=v.in_flight,
                        readable_seqs=tuple(int(s) for s in v.readable_seqs) or (0,),
                        applied_seq=int(v.applied_seq), overlay_bytes=int(v.overlay_bytes))


def _reason(e: grpc.aio.AioRpcError) -> str:
    """The server's x-embedding-reason trailer (delta_refused, version_not_loaded, ...)."""
    for key, value in e.trailing_metadata() or ():
        if key == "x-embedding-reason":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class ShardAdmin:
    def __init__(self, token: str, *, timeout_s: float = 600.0) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, addr: str) -> pb_grpc.EmbeddingServiceStub:
        ch = self._channels.get(addr)
        if ch is None:
            ch = self._channels[addr] = grpc.aio.insecure_channel(addr)
        return pb_grpc.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    def _error(self, addr: str, what: str, e: grpc.aio.AioRpcError,
               retryable: frozenset[grpc.StatusCode] = _RETRYABLE) -> FleetError:
        return FleetError(addr, f"{what}: {e.code().name}: {e.details()}",
                          retryable=e.code() in retryable, reason=_reason(e))

    async def versions(self, addr: str, model: str) -> list[ShardVersion]:
        try:
            resp = await self._stub(addr).ListVersions(
                pb.ListVersionsRequest(model=model), timeout=10.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(addr, "ListVersions", e) from None
        return [_version(v) for v in resp.versions if v.model == model]

    async def check_fit(self, addr: str, model: str, version: str) -> Fit:
        try:
            r = await self._stub(addr).CheckFit(
                pb.LoadVersionRequest(model=model, version=version), timeout=30.0,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(addr, f"CheckFit {model}/{version}", e) from None
        return Fit(fits=r.fits, required_bytes=r.required_bytes,
                   available_bytes=r.available_bytes, reason=r.reason)

    async def load(self, addr: str, model: str, version: str) -> ShardVersion:
        try:
            info = await self._stub(addr).LoadVersion(
                pb.LoadVersionRequest(model=model, version=version), timeout=self._timeout_s,
                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self._error(addr, f"LoadVersion {model}/{version}", e) from None
        return _version(info)

    async def unload(self, addr: str, model: str, version: str,
                     drain_timeout_s: float) -> ShardVersion:
        try:
            info = await self._stub(addr).UnloadVersion(
                pb.UnloadVersionRequest(model=model, version=version,
                                        drain_timeout_s=drain_timeout_s),
                timeout=drain_timeout_s + 30.0, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # already gone: unloading is idempotent
                return ShardVersion(model=model, version=version, state="absent")
            raise self._error(addr, f"UnloadVersion {model}/{version}", e) from None
        return _version(info)

    async def apply_deltas(self, addr: str, model: str, version: str, seq: int,
                           fingerprint: str) -> ShardVersion:
        try:
            info = await self._stub(addr).ApplyDeltas(
                pb.ApplyDeltasRequest(model=model, version=version, seq=seq,
                                      fingerprint=fingerprint),
                timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            err = self._error(addr, f"ApplyDeltas {model}/{version} seq {seq}", e,
                              _APPLY_RETRYABLE)
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.reason:
                err.reason = "over_budget"
            raise err from None
        return _version(info)

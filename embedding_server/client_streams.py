"""The client's stream transport: one long-lived LookupStream per shard replica.

A new unary call restarts HTTP/2 flow control at a 64 KB window and costs grpcio a
call setup each time; a message on an open stream costs a third to a half of that
(issue 10). So every replica of a shard gets one bidirectional stream, opened on first
use and re-opened after a backoff when it ends; lookups go round-robin over the streams
that are up, each with a fresh `id` that its answer echoes (answers come in any order).
A stream that breaks fails every lookup in flight on it with the stream's status, so
the client's one retry rule (embedding_server.client) moves them to a sibling; a lookup
may name replicas to avoid (those that said they cannot read its delta seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Collection, Sequence

import grpc
import grpc.aio

from modelpack.lookup import DRAINING, DRAINING_METADATA, REASON_METADATA
from protos import embedding_pb2 as pb

log = logging.getLogger(__name__)
_METHOD = "/hybrid.embedding.v1.EmbeddingService/LookupStream"
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_FINAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
          grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT}
# A stream that ended is re-opened no sooner than this, doubling per failed open up to the
# max: a SIGKILLed replica's port refuses at once, and must not be hammered meanwhile.
BACKOFF_S, MAX_BACKOFF_S = 0.1, 1.0
# dns:/// targets hide their replicas behind gRPC's round_robin: this many streams on the
# one channel, each placed on the next ready replica when it opens.
STREAMS_PER_RESOLVED_TARGET = 2


class AttemptFailed(Exception):
    """One try of one shard's lookup failed; the client decides whether to try again."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, replica: int = -1
                 ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.replica = replica  # the stream slot that refused it (-1: unknown, or unary)

    @property
    def draining(self) -> bool:
        return self.reason == DRAINING


def reason_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The `x-embedding-reason` of an error's trailing metadata ('' if none; draining if marked)."""
    md = tuple(metadata or ())
    for key, value in md:
        if key == REASON_METADATA:
            return value if isinstance(value, str) else value.decode()
    return DRAINING if DRAINING_METADATA in md else ""


class _Stream:
    """One opened LookupStream: its lookups in flight by id, and the task reading answers."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.LookupRequest, pb.LookupResponse]
                 ) -> None:
        self.call = call
        self.pending: dict[int, asyncio.Future[pb.LookupResponse]] = {}
        self.write_lock = asyncio.Lock()  # grpc allows one write in progress per call
        self.draining = False  # answered `draining`: send nothing more on it
        self.answered = False
        self.ended: AttemptFailed | None = None
        self.reader: asyncio.Task[None] | None = None


class _Replica:
    """A stream slot: at most one open stream to one replica (or one pick of a dns target)."""

    def __init__(self, index: int, name: str, method: grpc.aio.StreamStreamMultiCallable,
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        self.index = index
        self.name = name
        self._method = method
        self._metadata = metadata
        self.stream: _Stream | None = None
        self.retry_at = 0.0  # loop time before which no new stream is opened
        self.backoff_s = BACKOFF_S
        self.last_end: AttemptFailed | None = None  # how its last stream ended

    def usable(self, now: float) -> bool:
        s = self.stream
        return (s is None and now >= self.retry_at) or (s is not None and not s.draining)

    def _open(self) -> _Stream:
        stream = _Stream(self._method(metadata=self._metadata))
        stream.reader = asyncio.get_running_loop().create_task(self._read(stream))
        self.stream = stream
        return stream

    async def lookup(self, request: pb.LookupRequest, loop_deadline: float) -> pb.LookupResponse:
        stream = self.stream or self._open()
        fut: asyncio.Future[pb.LookupResponse] = asyncio.get_running_loop().create_future()
        stream.pending[request.id] = fut
        try:
            try:
                async with stream.write_lock:
                    await stream.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the stream is over: its reader fails `fut` with the stream's status
            async with asyncio.timeout_at(loop_deadline):
                resp = await fut
        except TimeoutError:
            raise AttemptFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded",
                                f"no answer from {self.name} before the deadline") from None
        finally:
            stream.pending.pop(request.id, None)
        if resp.HasField("failure"):
            f = resp.failure
            if f.reason == DRAINING:
                stream.draining = True
            raise AttemptFailed(_CODES.get(f.code, grpc.StatusCode.UNKNOWN), f.reason,
                                f"{self.name}: {f.message}", self.index)
        return resp

    async def _read(self, stream: _Stream) -> None:
        call = stream.call
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                stream.answered = True
                fut = stream.pending.get(resp.id)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
            md = await call.trailing_metadata()
            ended = AttemptFailed(grpc.StatusCode.UNAVAILABLE, reason_of(md),
                                  f"{self.name}: lookup stream ended")
        except grpc.aio.AioRpcError as e:
            # A stream that breaks (reset, or grpc's INTERNAL for a write to a dead call)
            # loses no lookup: they are reads, retried elsewhere like an UNAVAILABLE. Only a
            # refusal of the stream itself (no token, no such method) is final.
            code = e.code() if e.code() in _FINAL else grpc.StatusCode.UNAVAILABLE
            ended = AttemptFailed(code, reason_of(e.trailing_metadata()),
                                  f"{self.name}: {e.code().name}: {e.details()}")
        except asyncio.CancelledError:
            ended = AttemptFailed(grpc.StatusCode.CANCELLED, "", f"{self.name}: client closed")
        self._ended(stream, ended)

    def _ended(self, stream: _Stream, ended: AttemptFailed) -> None:
        stream.ended = ended
        if self.stream is stream:
            self.stream = None
            # A stream that served answers ended (drained, killed): try again soon. One that
            # never answered failed to open: back off further each time.
            self.backoff_s = BACKOFF_S if stream.answered else min(self.backoff_s * 2,
                                                                   MAX_BACKOFF_S)
            self.retry_at = asyncio.get_running_loop().time() + self.backoff_s
            self.last_end = ended
            if stream.answered:
                log.info("lookup stream to %s ended: %s", self.name, ended.message)
        for fut in stream.pending.values():
            if not fut.done():
                fut.set_exception(ended)
        stream.pending.clear()

    async def close(self) -> None:
        s, self.stream = self.stream, None
        if s is not None:
            s.call.cancel()
            if s.reader is not None:
                s.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await s.reader


class ShardStreams:
    """The streams to one shard's replicas, used round-robin; `lookup` is one attempt."""

    def __init__(self, addresses: Sequence[str], channel_options: Sequence[tuple[str, object]],
                 metadata: tuple[tuple[str, str], ...] | None) -> None:
        self._channels: list[grpc.aio.Channel] = []
        self._replicas: list[_Replica] = []
        for addr in addresses:
            resolved = ":///" in addr
            ch = grpc.aio.insecure_channel(addr if resolved else "ipv4:" + addr,
                                           options=list(channel_options))
            self._channels.append(ch)
            method = ch.stream_stream(_METHOD, request_serializer=pb.LookupRequest.SerializeToString,
                                      response_deserializer=pb.LookupResponse.FromString)
            n = STREAMS_PER_RESOLVED_TARGET if resolved else 1
            self._replicas += [_Replica(len(self._replicas) + i, addr, method, metadata)
                               for i in range(n)]
        self._turn = itertools.cycle(range(len(self._replicas)))
        self._ids = itertools.count(1)

    def channel(self, i: int) -> grpc.aio.Channel:
        """The channel of the i-th address given (one per address; for fixed addresses,
        slot i's replica): the routing table asks it ListVersions."""
        return self._channels[i]

    @property
    def size(self) -> int:
        """Stream slots (replicas, or picks of a dns target) a lookup can be tried on."""
        return len(self._replicas)

    def _pick(self, now: float, avoid: Collection[int]) -> _Replica:
        for _ in self._replicas:
            r = self._replicas[next(self._turn)]
            if r.usable(now) and r.index not in avoid:
                return r
        # Every replica is down or backing off. A refusal of the stream itself (no token)
        # stands until the backoff ends. Draining ones will be replaced (a sibling or a
        # restart): the retry rule waits for that up to the deadline; unreachable ones fail fast.
        ends = [r.last_end for r in self._replicas if r.last_end is not None]
        final = [e for e in ends if e.code in _FINAL]
        if final:
            raise final[0]
        draining = any(e.draining for e in ends) or any(
            r.stream is not None and r.stream.draining for r in self._replicas)
        last = f": {ends[-1].message}" if ends else ""
        raise AttemptFailed(grpc.StatusCode.UNAVAILABLE, DRAINING if draining else "",
                            f"no replica ready (of {', '.join(r.name for r in self._replicas)})"
                            + last)

    async def lookup(self, request: pb.LookupRequest, timeout_s: float,
                     avoid: Collection[int] = ()) -> pb.LookupResponse:
        """One attempt, on the next usable slot not in `avoid`."""
        now = asyncio.get_running_loop().time()
        request.id = next(self._ids)  # unique on every stream: an answer can only be ours
        return await self._pick(now, avoid).lookup(request, now + timeout_s)

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self._replicas))
        await asyncio.gather(*(c.close() for c in self._channels))

"""LookupStream: many lookups on one long-lived bidirectional stream, each answered by id.

A stream costs a third to a half of a unary call per lookup (no per-call HTTP/2 stream
setup, and the flow-control window stays open), which is why rankers use it. Per stream:
the gRPC handler thread only sends answers (it must: the sync server drains the
handler's generator on that thread); a reader thread of ours takes each request as it
arrives, answers it with the servicer's `answer` (the unary path's very checks) and
queues the wire bytes. Answers carry the request's id; a failed lookup gets a
LookupFailure, never the end of the stream.

SIGTERM (begin_drain): lookups already received are answered, later ones get failure
reason `draining`, and once every received lookup is answered and none arrived for
QUIET_S the stream ends with OK and trailing metadata x-embedding-draining: 1.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from embedding_server.errors import DRAINING, REASON_KEY, ServiceError, internal_error
from modelpack.lookup import DRAINING_METADATA
from protos import embedding_pb2 as pb

if TYPE_CHECKING:
    from embedding_server.servicer import EmbeddingServicer

log = logging.getLogger(__name__)
QUIET_S = 0.2  # draining: end a stream once it has had nothing to answer for this long
_END, _WAKE = object(), object()  # reader done (client half-closed or gone); drain started


class Stream:
    """One open LookupStream: answers waiting to be sent, and how many lookups came in."""

    def __init__(self) -> None:
        self.out: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.received = 0  # written by the reader thread only
        self.answered = 0  # written by the handler thread only


class StreamSet:
    """The open streams of one servicer, at most `limit` (each holds a gRPC thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[Stream] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def open(self) -> Stream:
        with self._lock:
            if len(self._open) >= self.limit:
                raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"{self.limit} LookupStreams already open (--max-streams); "
                                   "use another replica or unary Lookup")
            s = Stream()
            self._open.add(s)
            return s

    def close(self, s: Stream) -> None:
        with self._lock:
            self._open.discard(s)

    def wake_all(self) -> None:
        """Make every handler re-check the servicer's draining flag."""
        with self._lock:
            for s in self._open:
                s.out.put(_WAKE)


def failure(request: pb.LookupRequest, err: ServiceError) -> bytes:
    """A LookupResponse with only the id and the failure (no echo of unchecked names)."""
    code: int = err.code.value[0]
    out: bytes = pb.LookupResponse(id=request.id, failure=pb.LookupFailure(
        code=code, reason=err.reason, message=err.message)).SerializeToString()
    return out


def _answer_or_failure(servicer: EmbeddingServicer, request: pb.LookupRequest,
                       deadline: float | None) -> bytes:
    try:
        servicer.refuse_draining()
        return servicer.answer(request, deadline)
    except ServiceError as e:
        servicer.count_error(e)
        return failure(request, e)
    except Exception as e:  # a bug: this lookup fails, the stream and the server go on
        log.exception("streamed lookup failed")
        err = internal_error(e)
        servicer.count_error(err)
        return failure(request, err)


def _read(servicer: EmbeddingServicer, requests: Iterator[pb.LookupRequest], stream: Stream,
          deadline: float | None) -> None:
    try:
        for request in requests:
            stream.received += 1
            stream.out.put(_answer_or_failure(servicer, request, deadline))
    except grpc.RpcError:
        pass  # cancelled or the connection is gone: nobody is left to answer
    except Exception:  # e.g. a request that does not parse: the stream ends, the server goes on
        log.exception("LookupStream reader failed")
    finally:
        stream.out.put(_END)


def serve_stream(servicer: EmbeddingServicer, requests: Iterator[pb.LookupRequest],
                 context: grpc.ServicerContext) -> Iterator[bytes]:
    """The LookupStream handler: yields answers (wire bytes) until the stream ends."""
    try:
        servicer.lookup_token.check(context)  # once: metadata belongs to the stream
        servicer.refuse_draining()
        stream = servicer.streams.open()
    except ServiceError as e:
        servicer._abort(context, e)
    left = context.time_remaining()
    deadline = None if left is None or left > 1e8 else time.monotonic() + left
    threading.Thread(target=_read, args=(servicer, requests, stream, deadline), daemon=True,
                     name="lookup-stream").start()
    return _send(servicer, stream, context)


def _send(servicer: EmbeddingServicer, stream: Stream, context: grpc.ServicerContext
          ) -> Iterator[bytes]:
    try:
        while True:
            if servicer.draining:
                try:
                    item = stream.out.get(timeout=QUIET_S)
                except queue.Empty:
                    if stream.answered >= stream.received:
                        context.set_trailing_metadata((DRAINING_METADATA, (REASON_KEY, DRAINING)))
                        return
                    continue
            else:
                item = stream.out.get()
            if item is _END:
                return
            if isinstance(item, bytes):
                stream.answered += 1
                yield item
    finally:
        servicer.streams.close(stream)

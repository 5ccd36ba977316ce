"""LookupResponse wire bytes written directly into one buffer, rows gathered in place.

A LookupResponse built as protobuf objects copied a packed answer 4-5 times (tensor ->
tobytes -> TableResult.data -> SerializeToString -> gRPC). Here the answer's size is known
before any work (every group's vectors x row width), so the fixed fields are encoded by
hand into a numpy buffer of that size and each group's rows are gathered (or its pooled
vectors copied) straight into their place. Copies kept: packed rows 1 (the buffer's
tobytes(), which gRPC needs as `bytes`), pooled vectors 2 (kernel output -> buffer ->
bytes); gRPC then copies the bytes into its own slices. The bytes are exactly what
LookupResponse.SerializeToString() would produce (fields in number order, proto3
defaults omitted), which tests/unit/test_embedding_wire.py checks.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data if data else b""


def _int_field(tag: int, n: int) -> bytes:
    return bytes((tag,)) + varint(n) if n else b""


@lru_cache(maxsize=256)
def response_head(model: str, version: str, fingerprint: str, shard: int, num_shards: int) -> bytes:
    """LookupResponse fields 1-5 (the same for every answer of one version on one server)."""
    return (_len_field(0x0A, model.encode()) + _len_field(0x12, version.encode())
            + _len_field(0x1A, fingerprint.encode()) + _int_field(0x20, shard)
            + _int_field(0x28, num_shards))


def result_head(table: bytes, dim: int, count: int, data_len: int) -> bytes:
    """Field 6 (one TableResult) up to the start of its `data` bytes, which follow it."""
    body = (_len_field(0x0A, table) + _int_field(0x10, dim) + _int_field(0x18, count)
            + (b"\x22" + varint(data_len) if data_len else b""))
    return b"\x32" + varint(len(body) + data_len) + body


def id_field(rid: int) -> bytes:
    """Field 7, the echoed request id (after the results: field order as protobuf writes)."""
    return _int_field(0x38, rid)


class Answer:
    """One response's buffer: head, then per group its header and a slot for its data."""

    def __init__(self, head: bytes, parts: list[tuple[bytes, int]], tail: bytes) -> None:
        """parts: (result_head, data bytes) per group, in request order."""
        size = len(head) + sum(len(h) + n for h, n in parts) + len(tail)
        self.buf: npt.NDArray[np.uint8] = np.empty(size, dtype=np.uint8)
        self.slots: list[npt.NDArray[np.uint8]] = []
        pos = self._put(0, head)
        for h, n in parts:
            pos = self._put(pos, h)
            self.slots.append(self.buf[pos:pos + n])
            pos += n
        self._put(pos, tail)

    def _put(self, pos: int, data: bytes) -> int:
        end = pos + len(data)
        self.buf[pos:end] = np.frombuffer(data, dtype=np.uint8)
        return end

    def tobytes(self) -> bytes:
        return self.buf.tobytes()

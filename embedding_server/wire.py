"""LookupResponse wire bytes encoded by hand around the gathered arrays.

A LookupResponse built as protobuf objects copied a packed answer 4-5 times (tensor ->
tobytes -> TableResult.data -> SerializeToString -> gRPC). Here each group's small header
is encoded directly and `b"".join` takes the gather's (or the kernel's) output array
through the buffer protocol: one copy of the rows between the gather and gRPC, which
copies the bytes into its own slices. (Gathering into a preallocated answer buffer
instead measured slower: torch's index_select with out= plus the buffer's tobytes().)
The bytes are exactly what LookupResponse.SerializeToString() would produce (fields in
number order, proto3 defaults omitted), which tests/unit/test_embedding_wire.py checks.
"""

from __future__ import annotations

from functools import lru_cache


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


@lru_cache(maxsize=4096)  # the same table and batch size recur: a hit costs a hash, not 5 varints
def result_head(table: bytes, dim: int, count: int, data_len: int) -> bytes:
    """Field 6 (one TableResult) up to the start of its `data` bytes, which follow it."""
    body = (_len_field(0x0A, table) + _int_field(0x10, dim) + _int_field(0x18, count)
            + (b"\x22" + varint(data_len) if data_len else b""))
    return b"\x32" + varint(len(body) + data_len) + body


def id_field(rid: int) -> bytes:
    """Field 7, the echoed request id (after the results: field order as protobuf writes)."""
    return _int_field(0x38, rid)


def seq_field(seq: int) -> bytes:
    """Field 9, the delta seq the rows were read at (after the id: field order)."""
    return _int_field(0x48, seq)

"""embedding_server.wire: hand-encoded LookupResponse bytes equal protobuf's own serialization."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_server.wire import id_field, response_head, result_head, seq_field, varint
from protos import embedding_pb2 as pb


@pytest.mark.parametrize("n", [1, 127, 128, 300, 16383, 16384, 2**21, 2**35 + 7, 2**63 + 5])
def test_varint_is_protobufs(n: int) -> None:
    assert varint(n) == pb.LookupRequest(id=n).SerializeToString()[1:]  # after the tag byte
    assert varint(0) == b"\x00"


@pytest.mark.parametrize("rid", [0, 1, 2**40])
@pytest.mark.parametrize("shard", [0, 3])
@pytest.mark.parametrize("seq", [0, 5, 2**33])
def test_response_bytes_equal_serialize_to_string(rid: int, shard: int, seq: int) -> None:
    rng = np.random.default_rng(rid + shard)
    groups = [("unified", 16, rng.integers(0, 256, (n, 12), dtype=np.uint8)) for n in (0, 1, 200, 7000)]
    groups.append(("c" * 200, 4, rng.standard_normal((3, 4)).astype(np.float16)))
    head = response_head("tiny", "v1", "sha256:" + "ab" * 32, shard, 4)
    pieces = [head]
    for table, dim, data in groups:
        pieces += [result_head(table.encode(), dim, data.shape[0], data.nbytes), data.tobytes()]
    pieces += [id_field(rid), seq_field(seq)]
    want = pb.LookupResponse(model="tiny", version="v1", fingerprint="sha256:" + "ab" * 32, shard=shard,
                             num_shards=4, id=rid, seq=seq, results=[
                                 pb.TableResult(table=t, dim=d, count=a.shape[0], data=a.tobytes())
                                 for t, d, a in groups])
    assert b"".join(pieces) == want.SerializeToString()

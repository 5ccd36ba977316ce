"""Where a batch's packed INT4 rows come from: the TableSource protocol.

Both sources (RemoteTables in remote_tables.py over the embedding shards, LocalTables in
local_tables.py over in-process files) answer `lookup(version, queries, timeout_s)` with
one uint8 (rows, 4 + dim/2) array per query, read at the batch's delta seq (None: the
version's current one), and raise RankError on failure, so the pipeline does not care
which it has. CachedTables (cached_tables.py) wraps either with the row cache; on CUDA
its answers are already device tensors. `open_seq` readies a seq before the ranker
switches to it. `prepare` is the handshake that makes a version servable, and /readyz
runs it for every version with traffic. No grpc here: the pipeline imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from modelpack.lookup import Packed, TableQuery
from modelpack.manifest import Manifest
from ranker_server.versions import LoadedVersion

# One table query's rows: host numpy, or (a cached source on CUDA) already on the device.
Answer = Packed | torch.Tensor


class PrepareError(Exception):
    """A version some shard replica cannot serve (not READY, other fingerprint, unreachable)."""


class TableSource(Protocol):
    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> Sequence[Answer]: ...

    async def prepare(self, manifest: Manifest, *, min_replicas: int | None = None) -> None:
        """PrepareError unless the version is servable: `min_replicas` per shard hold it
        READY (None: the ranker's --prepare-min-replicas; 0: every replica)."""

    def open_version(self, manifest: Manifest) -> None: ...

    def open_seq(self, manifest: Manifest, seq: int) -> None:
        """Ready delta `seq` of a version (a worker thread); DeltaError if it cannot be read."""
        ...

    def close_version(self, version: str) -> None: ...

    async def close(self) -> None: ...

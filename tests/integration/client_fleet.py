"""What the embedding client's integration tests share: the tiny stores, shard servers on
free ports, expected rows read straight from the shard files (modelpack.int4, numpy:
never the server's or the client's code), queries and a client run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from embedding_server.client import EmbeddingClient
from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess
from modelpack.hashing import shard_of
from modelpack.int4 import dequantize_rows
from modelpack.lookup import TableQuery
from modelpack.manifest import read_manifest
from tests.helpers_store import tiny_version

ROWS, DIM, ROW_BYTES = 1000, 16, 12
TWO_SHARDS = ("--num-shards", "2", "--preload", "tiny/v1", "--grace-period", "20")
Float = npt.NDArray[np.float64]
T = TypeVar("T")


def shard_server(store: Path, log_dir: Path, name: str, *args: str, port: int = 0
                 ) -> ServerProcess:
    return ServerProcess.module("embedding_server", "--store", str(store), *args, log_dir=log_dir,
                                name=name, ready=grpc_serving, port=port)


def make_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`main` holds tiny/v1 (seed 1); `other` another build under the same name (seed 2)."""
    main, other = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("other")
    tiny_version(main, "v1", seed=1)
    tiny_version(other, "v1", seed=2)
    return {"main": main, "other": other}


def file_rows(store: Path, model: str, table: str, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Packed INT4 rows of global row ids, read straight from the version's shard files."""
    spec = read_manifest(store / model / "v1").table(table)
    shard, local = shard_of(rows, spec.rows, spec.num_shards)
    out = np.empty((rows.size, spec.row_bytes), np.uint8)
    for k in range(spec.num_shards):
        data = np.fromfile(store / model / "v1" / spec.shard_path(k), np.uint8).reshape(-1, spec.row_bytes)
        out[shard == k] = data[local[shard == k]]
    return out


def file_values(store: Path, model: str, table: str, rows: npt.NDArray[np.int64]) -> Float:
    return dequantize_rows(file_rows(store, model, table, rows), DIM).astype(np.float64)


def fingerprint(store: Path, model: str = "tiny") -> str:
    return read_manifest(store / model / "v1").fingerprint


def close(got: npt.NDArray[np.generic], want: Float, output: str) -> bool:
    rel = 2.0**-10 if output == "fp16" else 1e-5  # one rounding to the output type (+ fp32 sums)
    return bool(np.all(np.abs(got.astype(np.float64) - want) <= np.abs(want) * rel + 1e-4))


def query(rows: npt.NDArray[np.int64], output: str = "int4", pooling: str = "none",
          offsets: npt.NDArray[np.int64] | None = None, table: str = "unified") -> TableQuery:
    return TableQuery(table, ROWS if table == "unified" else 37, DIM, rows.astype(np.int64),
                      offsets, pooling, output)


def run_with(shards: list[list[str]], body: Callable[[EmbeddingClient], Awaitable[T]], *,
             timeout_s: float = 5.0, transport: str = "stream") -> T:
    """Run `await body(client)` on a fresh EmbeddingClient, then close it."""

    async def main() -> T:
        client = EmbeddingClient(shards, default_timeout_s=timeout_s, transport=transport)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def addresses(servers: dict[str, ServerProcess], *names: str) -> list[list[str]]:
    return [[servers[n].address] for n in names]

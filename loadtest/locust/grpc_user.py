"""Locust load on one embedding shard's gRPC `EmbeddingService.Lookup`.

    locust -f loadtest/locust/grpc_user.py --headless -u 4 -r 4 --run-time 20s \\
        --host 127.0.0.1:50051 --store demo_store

Locust has no gRPC user: `GrpcUser` is the usual one, a channel wrapped in a client
interceptor that times every unary call and fires `events.request` with request_type
"grpc" (gRPC is made gevent-cooperative first). At start the shard is asked what it
serves (ListVersions: shard k of S, READY versions); the manifest in `--store` gives
each table's rows, so every Lookup asks for `--lookup-rows` random rows per table inside
this shard's range, as packed INT4 rows (`--lookup-output int4`, what rankers ask for)
or dequantized and pooled in bags of `--bag-size` (`--lookup-pooling sum|mean`).
Answers naming another version or fingerprint are counted as failures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, task
from locust.env import Environment
from locust.exception import LocustError, StopUser
from locust.runners import MasterRunner

from loadtest.locust.hooks import on  # also registers the shared options and listeners
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

grpc_gevent.init_gevent()  # after Locust's monkey-patching, before any gRPC object exists

log = logging.getLogger("loadtest.grpc")
POOLING = {"none": pb.POOLING_NONE, "sum": pb.POOLING_SUM, "mean": pb.POOLING_MEAN}
OUTPUT = {"int4": pb.OUTPUT_INT4_PACKED, "fp16": pb.OUTPUT_FP16, "fp32": pb.OUTPUT_FP32}


@on("init_command_line_parser")
def _options(parser: Any, **_: Any) -> None:
    g = parser.add_argument_group("embedding lookups (loadtest/locust/grpc_user.py)")
    g.add_argument("--store", type=str, default="demo_store", env_var="LOADTEST_STORE",
                   help="model store the shard serves from (for table sizes; default demo_store)")
    g.add_argument("--model", type=str, default="ads_ctr", help="model (default ads_ctr)")
    g.add_argument("--lookup-version", type=str, default="",
                   help="version to look up (default: the shard's READY version)")
    g.add_argument("--lookup-rows", type=int, default=256,
                   help="rows per table per Lookup (default 256: 16 candidates x 16 rows)")
    g.add_argument("--lookup-output", choices=sorted(OUTPUT), default="int4",
                   help="int4 packed rows (default), or dequantized fp16/fp32")
    g.add_argument("--lookup-pooling", choices=sorted(POOLING), default="none",
                   help="none (default), or sum/mean over bags (needs fp16/fp32 output)")
    g.add_argument("--bag-size", type=int, default=16, help="rows per bag when pooling")


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Times every unary call and reports it to Locust as a "grpc" request."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation: Callable[[Any, Any], Any],
                              client_call_details: Any, request: Any) -> Any:
        start = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            response = continuation(client_call_details, request)
            length = response.result().ByteSize()
        except grpc.RpcError as e:
            exception = e
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        hook: Any = self.env.events.request
        hook.fire(
            request_type="grpc", name=name.rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            response=response, context=None, exception=exception)
        return response


class GrpcUser(User):
    """A User with `self.stub`: `stub_class` over an intercepted insecure channel to `host`."""

    abstract = True
    stub_class: ClassVar[Any] = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host or self.stub_class is None:
            raise LocustError("GrpcUser needs a host (HOST:PORT) and a stub_class")
        target = self.host.split("://", 1)[-1]
        self._channel = grpc.insecure_channel(target)
        intercepted = grpc.intercept_channel(self._channel, LocustInterceptor(environment))
        self.stub = self.stub_class(intercepted)

    def on_stop(self) -> None:
        self._channel.close()


@dataclass(frozen=True)
class ShardTarget:
    """What one shard serves: the version to ask for and each table's row range there."""

    model: str
    version: str
    fingerprint: str
    shard: int
    num_shards: int
    tables: tuple[tuple[str, int, int], ...]  # (table, first row, end row) of this shard


def discover(target: str, store: Path, model: str, version: str = "") -> ShardTarget:
    """Ask the shard what it serves and read the tables' sizes from the store."""
    from modelpack.hashing import shard_range
    from modelpack.manifest import read_manifest

    with grpc.insecure_channel(target) as ch:
        listing = pbg.EmbeddingServiceStub(ch).ListVersions(  # type: ignore[no-untyped-call]
            pb.ListVersionsRequest(model=model), timeout=10)
    ready = {v.version: v.fingerprint for v in listing.versions
             if v.state == pb.VERSION_STATE_READY}
    if version and version not in ready:
        raise ValueError(f"{target} does not serve {model}/{version} READY (it has {sorted(ready)})")
    if not ready:
        raise ValueError(f"{target} serves no READY version of {model}")
    version = version or sorted(ready)[-1]
    m = read_manifest(store / model / version)
    if m.fingerprint != ready[version]:
        raise ValueError(f"{store / model / version} is another build of {version} than "
                         f"{target} serves ({m.fingerprint[:19]} vs {ready[version][:19]})")
    tables = tuple((t.name, *shard_range(listing.shard, t.rows, listing.num_shards))
                   for t in m.tables)
    return ShardTarget(model, version, m.fingerprint, listing.shard, listing.num_shards, tables)


class EmbeddingLookupUser(GrpcUser):
    """Back-to-back Lookups of random rows of every table on one shard."""

    host = "127.0.0.1:50051"
    stub_class = pbg.EmbeddingServiceStub
    target: ClassVar[ShardTarget | None] = None

    def on_start(self) -> None:
        if EmbeddingLookupUser.target is None:
            raise StopUser()
        opts = self.environment.parsed_options
        self._rows = int(getattr(opts, "lookup_rows", 256))
        self._pooling = str(getattr(opts, "lookup_pooling", "none"))
        self._output = str(getattr(opts, "lookup_output", "int4"))
        self._bag = max(1, int(getattr(opts, "bag_size", 16)))
        self._rng = np.random.default_rng()

    def request(self) -> pb.LookupRequest:
        t = EmbeddingLookupUser.target
        assert t is not None
        groups = []
        for name, start, stop in t.tables:
            rows = self._rng.integers(start, stop, self._rows, dtype=np.int64)
            g = pb.TableLookup(table=name, rows=rows.astype("<i8").tobytes(),
                               pooling=POOLING[self._pooling], output=OUTPUT[self._output])
            if self._pooling != "none":
                offsets = np.append(np.arange(0, self._rows, self._bag), self._rows)
                g.offsets = offsets.astype("<i8").tobytes()
            groups.append(g)
        return pb.LookupRequest(model=t.model, version=t.version, fingerprint=t.fingerprint,
                                tables=groups)

    @task
    def lookup(self) -> None:
        t = EmbeddingLookupUser.target
        assert t is not None
        try:
            resp = self.stub.Lookup(self.request(), timeout=5)
        except grpc.RpcError:
            return  # already reported as a failure by the interceptor
        if resp.version != t.version or resp.fingerprint != t.fingerprint:
            hook: Any = self.environment.events.request
            hook.fire(
                request_type="grpc", name="Lookup version check", response_time=0.0,
                response_length=0, response=resp, context=None,
                exception=AssertionError(f"asked {t.version}, answered {resp.version} "
                                         f"({resp.fingerprint[:19]})"))


@on("init")
def _discover(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, MasterRunner):
        return
    if "EmbeddingLookupUser" not in {c.__name__ for c in environment.user_classes}:
        return
    host = (environment.host or EmbeddingLookupUser.host).split("://", 1)[-1]
    try:
        EmbeddingLookupUser.target = discover(host, Path(str(getattr(opts, "store", "demo_store"))),
                                              str(getattr(opts, "model", "ads_ctr")),
                                              str(getattr(opts, "lookup_version", "")))
    except (grpc.RpcError, ValueError, OSError) as e:
        log.error("cannot prepare lookups against %s: %s", host, e)
        raise SystemExit(2) from None
    t = EmbeddingLookupUser.target
    log.info("looking up %s/%s on shard %d of %d: %s", t.model, t.version, t.shard, t.num_shards,
             ", ".join(f"{n} rows [{a}, {b})" for n, a, b in t.tables))

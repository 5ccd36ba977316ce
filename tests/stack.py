"""The whole stack for e2e tests: a small demo store, real processes on loopback, steady load.

Shared by tests/e2e/test_rollout.py (R1, R3) and tests/e2e/test_reliability*.py (R2, R4,
R5). The command lines are loadtest/stack/commands.py's (the same ones `make demo` and
`make up` use), the readiness probes loadtest/harness/probes.py's; the processes are
loadtest/harness/process.py's ServerProcess, so a server that dies fails the test at once
with its log's tail. The load is loadtest/harness/load.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from loadtest.harness.load import HttpPool, RunResult, closed_loop
from loadtest.harness.probes import LOOPBACK, grpc_serving, http_ready, metric_sum
from loadtest.harness.process import ServerProcess, start_all, stop_all
from loadtest.stack.commands import controller_args, fleet_json, ranker_args, shard_args
from modelpack.demo import DemoSize, build_demo_store
from modelpack.manifest import parse_manifest, write_manifest

MODEL = "ads_ctr"
TOKEN = "e2e-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SMALL_STORE = DemoSize(rows=4000, requests=500, eval_requests=60)


def corrupt_copy(store: Path, src: str, dst: str, *, shard_file: str = "shard-1-of-",
                 flip: int = 0x01, where: float = 0.5) -> Path:
    """STORE/MODEL/dst: `src` renamed, with one byte of one table file XORed with `flip`.

    The manifest is rewritten for the new name but keeps the original files' sha256, so
    the damage is exactly what a checksum must catch.
    """
    bad = store / MODEL / dst
    shutil.copytree(store / MODEL / src, bad)
    m = parse_manifest(json.loads((bad / "manifest.json").read_text()))
    write_manifest(bad, replace(m, version=dst))
    table = next(p for p in sorted((bad / "tables").rglob(f"{shard_file}*.bin")))
    data = bytearray(table.read_bytes())
    data[int(len(data) * where)] ^= flip
    table.write_bytes(bytes(data))
    return table


def build_store(root: Path) -> Path:
    """The small demo store (v1, v2) plus v2bad: v2 with one flipped bit in shard 1's table."""
    build_demo_store(root, SMALL_STORE, progress=False)
    corrupt_copy(root, "v2", "v2bad")
    return root


def eval_requests(store: Path, version: str = "v1") -> list[dict[str, Any]]:
    """The eval set's rank requests, unpinned (the split decides) and without labels."""
    reqs = []
    for line in (store / MODEL / version / "eval.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("labels", None)
        r.pop("version", None)  # never pin: the split decides
        reqs.append(r)
    return reqs


@dataclass
class Stack:
    store: Path
    dir: Path
    token: Path
    fleet_file: Path
    ranker: ServerProcess
    shards: list[ServerProcess]
    requests: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[list[ServerProcess]] = field(default_factory=list)
    gates: tuple[str, ...] = ()  # controller flags every controller() gets before `extra`

    @property
    def ranker_url(self) -> str:
        return f"http://{self.ranker.address}"

    def controller(self, name: str, journal: Path, *extra: str,
                   crash_at: str = "") -> ServerProcess:
        env = {"DEPLOY_CONTROLLER_CRASH_AT": crash_at} if crash_at else {}
        return ServerProcess.module(
            "deploy_controller", *controller_args(self.store, journal, self.fleet_file,
                                                  self.token, *self.gates, *extra),
            log_dir=self.dir, name=name, env=env)

    def ranker_status(self, ranker: ServerProcess | None = None) -> dict[str, Any]:
        r = httpx.get(f"http://{(ranker or self.ranker).address}/admin/v1/versions",
                      headers=AUTH, timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def shard_versions(self) -> list[dict[str, str]]:
        import grpc

        from protos import embedding_pb2 as pb
        from protos import embedding_pb2_grpc as pbg

        out = []
        for s in self.shards:
            with grpc.insecure_channel(s.address) as ch:
                resp = pbg.EmbeddingServiceStub(ch).ListVersions(  # type: ignore[no-untyped-call]
                    pb.ListVersionsRequest(model=MODEL), timeout=5)
            out.append({v.version: pb.VersionState.Name(v.state) for v in resp.versions})
        return out

    def mismatches(self, ranker: ServerProcess | None = None) -> float:
        return metric_sum(ranker or self.ranker, "ranker_version_mismatch_total")

    def assert_consistent(self, version: str) -> None:
        """Exactly one version everywhere, prepared on the ranker and READY on every shard."""
        st = self.ranker_status()
        assert st["active"] == version and st["split"] == {version: 1.0}, st
        assert [v["version"] for v in st["versions"]] == [version], st
        assert st["versions"][0]["state"] == "active"
        assert self.shard_versions() == [{version: "VERSION_STATE_READY"}] * len(self.shards)


def start_ranker(store: Path, d: Path, token: Path, shards: Sequence[Sequence[ServerProcess]],
                 name: str = "ranker", *extra: str) -> ServerProcess:
    """One more ranker over the given shard replicas (started, not yet waited for)."""
    args = ranker_args(store, MODEL, "v1", [[s.address for s in reps] for reps in shards],
                       token, "--device", "cpu", *extra)
    return ServerProcess.module("ranker_server", *args, log_dir=d, name=name, ready=http_ready)


@contextlib.contextmanager
def start_stack(store: Path, d: Path, *, replicas: Sequence[int] = (1, 1),
                ranker_extra: Sequence[str] = (), gates: Sequence[str] = (),
                shard_extra: Sequence[str] = ()) -> Iterator[Stack]:
    """Shards (replicas[k] processes for shard k) and one ranker, all on v1; stopped after."""
    token = d / "token"
    token.write_text(TOKEN + "\n")
    replica_procs = [[ServerProcess.module(
        "embedding_server", *shard_args(store, MODEL, "v1", k, len(replicas), token,
                                        "--drain-timeout", "10", *shard_extra),
        log_dir=d, name=f"shard{k}" if n == 1 else f"shard{k}r{r}", ready=grpc_serving)
        for r in range(n)] for k, n in enumerate(replicas)]
    everyone = [p for reps in replica_procs for p in reps]
    start_all(everyone)
    ranker = start_ranker(store, d, token, replica_procs, "ranker", *ranker_extra)
    try:
        ranker.start().wait_ready()
    except BaseException:
        stop_all(everyone, signal.SIGKILL)
        raise
    fleet_file = d / "fleet.json"
    fleet_file.write_text(fleet_json([f"http://{ranker.address}"],
                                     [[s.address for s in reps] for reps in replica_procs]))
    try:
        yield Stack(store, d, token, fleet_file, ranker, [reps[0] for reps in replica_procs],
                    eval_requests(store), replica_procs, tuple(gates))
    finally:
        ranker.stop()
        stop_all(everyone)


@dataclass(frozen=True)
class Result:
    """One request of a Load: wall-clock send and answer (time.time()), status, version."""

    t0: float
    t1: float
    status: int
    version: str  # the version that answered a 200; otherwise the error or the answer's body


def _version(status: int, body: bytes) -> str:
    if status == 200:
        return str(json.loads(body).get("version", ""))
    return body.decode(errors="replace")


class Load:
    """Steady closed-loop load on the ranker while a test moves versions.

    loadtest.harness.load.closed_loop with `threads` requests in flight (JSON rank
    requests of the eval set, plus `extra` fields), run on its own event loop in a
    background thread, bounded in count and time; `results` holds every request once
    the `with` block has ended.
    """

    def __init__(self, stack: Stack, threads: int = 2, max_requests: int = 40_000,
                 max_s: float = 240.0, *, extra: dict[str, Any] | None = None) -> None:
        self.port = stack.ranker.port
        self.concurrency, self.max_requests, self.max_s = threads, max_requests, max_s
        self.bodies = [json.dumps({**r, **(extra or {})}).encode() for r in stack.requests]
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    async def _load(self) -> RunResult:
        pool = HttpPool(LOOPBACK, self.port)
        try:
            return await closed_loop(pool, "/v1/rank", self.bodies, concurrency=self.concurrency,
                                     duration_s=self.max_s, content_type="application/json",
                                     max_requests=self.max_requests, stop=self._stop.is_set,
                                     label=_version)
        finally:
            await pool.close()

    def _run(self) -> None:
        try:
            res = asyncio.run(self._load())
        except BaseException as e:  # re-raised in the test's thread by __exit__
            self._error = e
            return
        t = res.started_at
        self.results = [Result(t + due, t + due + lat, status, version) for due, lat, status, version
                        in zip(res.due_s, res.latency_s, res.status, res.labels, strict=True)]

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(30)
        if et is None and (self._error is not None or self._thread.is_alive()):
            raise RuntimeError("the load generator failed or did not stop") from self._error

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]

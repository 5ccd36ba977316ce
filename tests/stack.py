"""The whole stack for e2e tests: a small demo store, real processes on loopback, steady load.

Shared by tests/e2e/test_rollout.py (R1, R3) and tests/e2e/test_reliability*.py (R2, R4,
R5). The command lines and readiness probes are loadtest/stack/local.py's (the same ones
`make demo` and `make up` use); the processes are loadtest/harness/process.py's ServerProcess, so a
server that dies fails the test at once with its log's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from loadtest.harness.process import ServerProcess, start_all
from loadtest.stack.local import grpc_serving, http_ready, ranker_args, shard_args
from modelpack.demo import DemoSize, build_demo_store
from modelpack.manifest import parse_manifest, write_manifest

MODEL = "ads_ctr"
TOKEN = "e2e-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SMALL_STORE = DemoSize(rows=4000, requests=500, eval_requests=60)


def ready(s: ServerProcess) -> bool:
    return http_ready(s.address)


def serving(s: ServerProcess) -> bool:
    return grpc_serving(s.address)


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
            "deploy_controller", "--journal", str(journal), "--admin-token-file",
            str(self.token), "--discovery", "local", "--fleet", str(self.fleet_file),
            "--store", str(self.store), *self.gates, *extra, log_dir=self.dir, name=name,
            env=env)

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
        text = httpx.get(f"http://{(ranker or self.ranker).address}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ranker_version_mismatch_total"))

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
    return ServerProcess.module("ranker_server", *args, log_dir=d, name=name, ready=ready)


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
        log_dir=d, name=f"shard{k}" if n == 1 else f"shard{k}r{r}", ready=serving)
        for r in range(n)] for k, n in enumerate(replicas)]
    everyone = [p for reps in replica_procs for p in reps]
    start_all(everyone)
    ranker = start_ranker(store, d, token, replica_procs, "ranker", *ranker_extra)
    try:
        ranker.start().wait_ready()
    except BaseException:
        for s in everyone:
            s.stop(signal.SIGKILL)
        raise
    fleet_file = d / "fleet.json"
    fleet_file.write_text(json.dumps({"rankers": [f"http://{ranker.address}"],
                                      "embedding_shards": [[s.address for s in reps]
                                                           for reps in replica_procs]}))
    try:
        yield Stack(store, d, token, fleet_file, ranker, [reps[0] for reps in replica_procs],
                    eval_requests(store), replica_procs, tuple(gates))
    finally:
        ranker.stop()
        for s in everyone:
            s.stop()


@dataclass
class Result:
    t0: float
    t1: float
    status: int
    version: str


class Load:
    """Steady closed-loop load on the ranker from `threads` threads, bounded in count and time."""

    def __init__(self, stack: Stack, threads: int = 2, max_requests: int = 40_000,
                 max_s: float = 240.0, *, extra: dict[str, Any] | None = None,
                 url: str | None = None) -> None:
        self.stack, self.threads = stack, threads
        self.max_requests, self.max_s = max_requests, max_s
        self.extra = extra or {}
        self.url = url or stack.ranker_url
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self, offset: int) -> None:
        deadline = time.monotonic() + self.max_s
        reqs = self.stack.requests
        with httpx.Client(base_url=self.url, timeout=10) as c:
            i = offset
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if len(self.results) >= self.max_requests:
                        return
                body = {**reqs[i % len(reqs)], **self.extra}
                i += self.threads
                t0 = time.time()
                try:
                    resp = c.post("/v1/rank", json=body)
                    status = resp.status_code
                    version = resp.json().get("version", "") if status == 200 else resp.text
                except httpx.HTTPError as e:
                    status, version = -1, repr(e)
                with self._lock:
                    self.results.append(Result(t0, time.time(), status, version))

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(15)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]


# ------------------------------------------------------------------ open-loop load (R5)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.used = False
        self.idle_since = 0.0


class RawHttp:
    """A bare asyncio HTTP/1.1 keep-alive pool for POSTs: about 0.1 ms of client CPU a request.

    httpx costs several times more, which on 2 shared cores would throttle the very server
    an overload test wants to overload. uvicorn closes keep-alive connections idle for
    5 s: pooled connections idle for `max_idle_s` are dropped rather than reused, and a
    request on a reused connection that the server closed before answering a single byte
    is sent again once, on a fresh connection.
    """

    def __init__(self, host: str, port: int, content_type: str = "application/json",
                 max_idle_s: float = 3.0) -> None:
        self.host, self.port, self.content_type = host, port, content_type
        self.max_idle_s = max_idle_s
        self._idle: list[_Conn] = []

    async def _conn(self, fresh: bool) -> _Conn:
        now = time.monotonic()
        while self._idle and not fresh:
            c = self._idle.pop()
            if now - c.idle_since < self.max_idle_s:
                return c
            c.writer.close()
        return _Conn(*await asyncio.open_connection(self.host, self.port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode("ascii")
        for attempt in range(2):
            conn = await self._conn(fresh=attempt > 0)
            reused = conn.used
            conn.used = True
            try:
                conn.writer.write(head + body)
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (OSError, asyncio.IncompleteReadError) as e:
                conn.writer.close()
                got = e.partial if isinstance(e, asyncio.IncompleteReadError) else b""
                if reused and not got and attempt == 0:
                    continue  # a stale keep-alive connection: nothing was answered
                raise
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            payload = await conn.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                conn.writer.close()
            else:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            return status, payload
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for c in self._idle:
            c.writer.close()
        self._idle.clear()


@dataclass
class Shot:
    """One open-loop request: when it was due and sent, how long it took, what came back."""

    due: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    error: str = ""

    @property
    def latency_s(self) -> float:
        """From the actual send (the server's latency, not the generator's lag)."""
        return self.done - self.sent


async def open_loop(client: RawHttp, bodies: Sequence[bytes], offsets: Sequence[float],
                    timeout_s: float = 10.0) -> list[Shot]:
    """Send bodies[i % n] at offsets[i] seconds from now, whether or not earlier ones answered."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    shots = [Shot(start + off) for off in offsets]

    async def one(i: int) -> None:
        s = shots[i]
        s.sent = loop.time()
        try:
            s.status, _ = await asyncio.wait_for(client.post("/v1/rank", bodies[i % len(bodies)]),
                                                 timeout_s)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
            s.status, s.error = -1, f"{type(e).__name__}: {e}"
        s.done = loop.time()

    tasks = []
    for i, s in enumerate(shots):
        delay = s.due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for s in shots:  # report times relative to the schedule's start
        s.due, s.sent, s.done = s.due - start, s.sent - start, s.done - start
    return shots


async def closed_loop(client: RawHttp, bodies: Sequence[bytes], concurrency: int,
                      duration_s: float) -> list[Shot]:
    """`concurrency` workers, each sending its next request when the last one answered."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    shots: list[Shot] = []
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while loop.time() - start < duration_s:
            i = next(counter)
            s = Shot(loop.time() - start, loop.time() - start)
            try:
                s.status, _ = await client.post("/v1/rank", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                s.status, s.error = -1, f"{type(e).__name__}: {e}"
            s.done = loop.time() - start
            shots.append(s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return shots

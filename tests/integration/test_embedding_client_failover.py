"""embedding_server.client against real servers: replicas, failover, deadlines, the token.

Servers (started once per module, in parallel, on free ports): s0, s1, shards 0 and 1 of 2
of `tiny/v1`; b, c, d, three more replicas of shard 1, the victims of the failover tests
(each sends its lookups over two replicas of shard 1 plus s0). Tests that need a server
to kill and restart start their own. Failover runs over unary `Lookup` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedding_server.client import EmbeddingClient, EmbeddingLookupError, VersionMismatchError
from loadtest.harness.process import ServerProcess, start_all, stop_all
from tests.integration.client_fleet import (
    ROW_BYTES,
    ROWS,
    TWO_SHARDS,
    addresses,
    file_rows,
    fingerprint,
    make_stores,
    query,
    run_with,
    shard_server,
)

C = grpc.StatusCode


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    procs = {
        "s0": shard_server(stores["main"], logs, "s0", "--shard", "0", *TWO_SHARDS),
        "s1": shard_server(stores["main"], logs, "s1", "--shard", "1", *TWO_SHARDS),
        **{r: shard_server(stores["main"], logs, r, "--shard", "1", *TWO_SHARDS,
                           "--metrics-port", "0") for r in ("b", "c", "d")},
    }
    start_all(procs.values())
    yield procs
    stop_all(procs.values(), signal.SIGKILL)


def _stream(servers: dict[str, ServerProcess], stores: dict[str, Path], replicas: tuple[str, str],
            sig: int, transport: str = "stream", total: int = 600, concurrency: int = 8,
            at: int = 150) -> tuple[list[str], int, float]:
    """`total` lookups, `concurrency` at a time, over s0 and two replicas of shard 1; `sig`
    hits the second replica after `at` answers. Returns one outcome per lookup, the
    victim's exit code, and the rows the victim had served when it got the signal."""
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, ROWS, 256) for _ in range(16)]
    want = [file_rows(stores["main"], "tiny", "unified", b).tobytes() for b in batches]
    fp = fingerprint(stores["main"])
    outcomes: list[str] = []
    victim_proc = servers[replicas[1]]
    served = [0.0]

    async def body(c: EmbeddingClient) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                try:
                    [got] = await c.lookup("tiny", "v1", fp, [query(batches[i % 16])], timeout_s=5.0)
                    outcomes.append("ok" if got.tobytes() == want[i % 16] else "WRONG DATA")
                except EmbeddingLookupError as e:
                    outcomes.append(f"{e.code}: {e}")
                if len(outcomes) == at:
                    served[0] = _rows_served(victim_proc)
                    victim_proc.send(sig)

        await asyncio.gather(*(one(i) for i in range(total)))

    run_with([[servers["s0"].address], [servers[n].address for n in replicas]], body,
             transport=transport)
    # Wait for the exit the one signal causes; stop() would signal again if it still ran.
    victim_proc.wait(30)
    return outcomes, victim_proc.stop(sig, timeout=30), served[0]


def _rows_served(s: ServerProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r'^embedding_rows_total\{output="int4_packed",table="unified"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(("transport", "victim"), [("stream", "b"), ("unary", "d")])
def test_sigkill_of_one_replica_mid_stream_loses_no_lookup(
        stores: dict[str, Path], servers: dict[str, ServerProcess], transport: str,
        victim: str) -> None:
    outcomes, code, served = _stream(servers, stores, ("c", victim), signal.SIGKILL, transport)
    assert code == -signal.SIGKILL
    assert served > 0  # the victim was in the rotation when it died
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 600 and not failed, failed[:5]
    servers["c"].check_alive()


def test_sigterm_of_one_replica_mid_stream_loses_no_lookup(
        stores: dict[str, Path], servers: dict[str, ServerProcess]) -> None:
    """The victim answers what its streams already carry, refuses the rest as `draining`
    (retried on s1), ends its streams and exits 0."""
    outcomes, code, served = _stream(servers, stores, ("s1", "c"), signal.SIGTERM)
    assert code == 0, servers["c"].log_tail()  # drained and exited cleanly
    assert served > 0
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 600 and not failed, failed[:5]
    assert "draining:" in servers["c"].log_tail()


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_too_short_a_deadline_is_deadline_exceeded(servers: dict[str, ServerProcess],
                                                   transport: str) -> None:
    big = np.random.default_rng(5).integers(0, ROWS, 1_000_000)

    async def body(c: EmbeddingClient) -> None:
        t0 = time.perf_counter()
        try:
            await c.lookup("tiny", "v1", "", [query(big, "fp32")], timeout_s=0.02)
        finally:  # the deadline holds: no waiting for the answer
            assert time.perf_counter() - t0 < 0.5

    with pytest.raises(EmbeddingLookupError) as e:
        run_with(addresses(servers, "s0", "s1"), body, transport=transport)
    assert e.value.code == C.DEADLINE_EXCEEDED, e.value
    assert not isinstance(e.value, VersionMismatchError)

    async def small(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(np.arange(5))], timeout_s=5.0)

    [got] = run_with(addresses(servers, "s0", "s1"), small)
    assert got.shape == (5, ROW_BYTES)  # the servers are fine afterwards


def test_a_shard_with_no_live_replica_fails_fast_and_heals_when_it_restarts(
        stores: dict[str, Path], servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    """Its port refuses connections at once: the lookup must not wait out its deadline. A
    replica restarted on its old address serves the same client again within its backoff."""
    victim = shard_server(stores["main"], tmp_path, "victim", "--shard", "1", "--num-shards", "2",
                     "--preload", "tiny/v1")
    rows = np.arange(0, ROWS, 7)
    healed_after = [float("inf")]

    async def body(c: EmbeddingClient) -> list[tuple[str, float]]:
        [got] = await c.lookup("tiny", "v1", "", [query(rows)])
        assert np.array_equal(got, file_rows(stores["main"], "tiny", "unified", rows))
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        outcomes = []
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                await c.lookup("tiny", "v1", "", [query(rows)])
                outcomes.append(("ok", time.perf_counter() - t0))
            except EmbeddingLookupError as e:
                assert e.shard == 1, e
                outcomes.append((str(e.code), time.perf_counter() - t0))
        with shard_server(stores["main"], tmp_path, "again", "--shard", "1", "--num-shards", "2",
                     "--preload", "tiny/v1", port=victim.port):
            serving = time.perf_counter()
            while time.perf_counter() - serving < 5:
                with contextlib.suppress(EmbeddingLookupError):
                    [got] = await c.lookup("tiny", "v1", "", [query(rows)])
                    healed_after[0] = time.perf_counter() - serving
                    break
                await asyncio.sleep(0.05)
        return outcomes

    with victim:
        outcomes = run_with([[servers["s0"].address], [victim.address]], body, timeout_s=2.0)
    assert all(code == str(C.UNAVAILABLE) and took < 0.2 for code, took in outcomes), outcomes
    assert healed_after[0] < 1.5, healed_after  # reconnect backoff: at most 1 s


def test_the_lookup_token_is_sent_when_the_shard_wants_one(
        stores: dict[str, Path], servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    (tmp_path / "token").write_text("d4ta-t0ken")
    guarded = shard_server(stores["main"], tmp_path, "guarded", "--shard", "1", "--num-shards", "2",
                      "--preload", "tiny/v1", "--lookup-token-file", str(tmp_path / "token"))
    rows = np.arange(0, ROWS, 7)

    async def lookup(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(rows)])

    async def with_token() -> list[npt.NDArray[np.generic]]:
        c = EmbeddingClient([[servers["s0"].address], [guarded.address]], lookup_token="d4ta-t0ken")
        try:  # shard 0 has no token of its own and ignores the header
            return await lookup(c)
        finally:
            await c.close()

    with guarded:
        with pytest.raises(EmbeddingLookupError) as e:
            run_with([[servers["s0"].address], [guarded.address]], lookup)
        assert e.value.code == C.UNAUTHENTICATED and e.value.shard == 1
        [got] = asyncio.run(with_token())
    assert np.array_equal(got, file_rows(stores["main"], "tiny", "unified", rows))

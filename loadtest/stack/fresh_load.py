"""The freshness scenario's load: eval requests to every ranker at a fixed rate, every answer kept.

A background thread runs an asyncio loop over keep-alive pools (loadtest.harness.load.HttpPool),
one per ranker, and sends request k to ranker k % N at start + k / rate (open loop: a slow
answer does not delay the next request). Bodies are protobuf (`application/x-protobuf`):
RankResponse carries `version` and `seq` by contract (protos/ranker.proto), so every
answer says which (version, seq) scored it. Each answer is kept whole (scores included)
as a fresh_timeline.Answer for the offline checks afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np

from loadtest.harness.load import HttpError, HttpPool
from loadtest.stack.fresh_timeline import Answer

log = logging.getLogger(__name__)
PROTOBUF = "application/x-protobuf"


def parse_rank_answer(status: int, payload: bytes, expected: int) -> tuple[str, int, np.ndarray | None, str]:
    """(version, seq, scores, error) of one protobuf /v1/rank answer; error '' when good."""
    if status != 200:
        return "", 0, None, f"HTTP {status}: {payload[:200].decode(errors='replace')}"
    from protos import ranker_pb2

    try:
        msg = ranker_pb2.RankResponse.FromString(payload)
    except Exception as e:  # a malformed 200 is a failure, whatever broke
        return "", 0, None, f"unreadable answer: {type(e).__name__}: {e}"
    scores = np.frombuffer(msg.scores, dtype="<f4").astype(np.float32)
    if not msg.version:
        return "", 0, None, "answer names no version"
    if scores.size != expected:
        return msg.version, int(msg.seq), None, f"{scores.size} scores for {expected} candidates"
    if not (np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1):
        return msg.version, int(msg.seq), None, "scores not finite probabilities"
    return msg.version, int(msg.seq), scores, ""


class Load:
    """Open-loop load on `ranker_urls` from a background thread: start(), then stop() -> answers."""

    def __init__(self, ranker_urls: Sequence[str], bodies: Sequence[bytes], sizes: Sequence[int],
                 rate: float, *, timeout_s: float = 10.0, seed: int = 0) -> None:
        if rate <= 0 or not ranker_urls or not bodies or len(bodies) != len(sizes):
            raise ValueError(f"load needs rate > 0, rankers and one size per body; got rate "
                             f"{rate}, {len(ranker_urls)} rankers, {len(bodies)} bodies, "
                             f"{len(sizes)} sizes")
        self.targets = [urlsplit(u) for u in ranker_urls]
        self.bodies, self.sizes = bodies, sizes
        self.rate, self.timeout_s = rate, timeout_s
        self.order = np.random.default_rng(seed).permutation(len(bodies))
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="fresh-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 15.0) -> list[Answer]:
        """Stop sending; wait (up to `drain_s`) for the answers in flight; all answers so far."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s + self.timeout_s)
        return sorted(self.answers, key=lambda a: a.t_sent)

    async def _run(self) -> None:
        pools = [HttpPool(t.hostname or "127.0.0.1", t.port or 80) for t in self.targets]
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        k = 0
        try:
            while not self._stop.is_set():
                delay = start + k / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                r = k % len(pools)
                t = asyncio.create_task(self._one(pools[r], r, int(self.order[k % len(self.order)])))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                k += 1
            if tasks:
                await asyncio.wait(tasks, timeout=self.timeout_s + 5)
        finally:
            for p in pools:
                await p.close()

    async def _one(self, pool: HttpPool, ranker: int, i: int) -> None:
        sent = time.time()
        try:
            status, payload = await asyncio.wait_for(
                pool.request("POST", "/v1/rank", self.bodies[i], PROTOBUF), self.timeout_s)
        except (HttpError, TimeoutError) as e:
            self.answers.append(Answer(sent, time.time(), ranker, i, -1,
                                       error=f"{type(e).__name__}: {e}"))
            return
        version, seq, scores, error = parse_rank_answer(status, payload, self.sizes[i])
        self.answers.append(Answer(sent, time.time(), ranker, i, status, version, seq,
                                   scores if not error else None, error))
        if error:
            log.warning("ranker %d, request %d: %s", ranker, i, error)


class SeqPoller:
    """Polls every ranker's GET /admin/v1/versions (the seq new batches read at) from a thread.

    `observed[r]` is ranker r's list of (time.time(), version, seq), one per poll: when a
    ranker started serving a seq, to the poll interval, without waiting for an answer."""

    def __init__(self, ranker_urls: Sequence[str], token: str, interval_s: float = 0.1) -> None:
        self.urls, self.token, self.interval_s = list(ranker_urls), token, interval_s
        self.observed: dict[int, list[tuple[float, str, int]]] = {r: [] for r in range(len(self.urls))}
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SeqPoller:
        self._thread = threading.Thread(target=self._run, name="fresh-seq-poll", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def serving(self, version: str) -> dict[int, list[tuple[float, int]]]:
        """Per ranker, (time, seq) of `version` in poll order: fresh_timeline.freshness_lags' input."""
        return {r: [(t, s) for t, v, s in obs if v == version] for r, obs in self.observed.items()}

    def _run(self) -> None:
        import httpx

        headers = {"authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=2.0, headers=headers) as c:
            while not self._stop.is_set():
                for r, url in enumerate(self.urls):
                    try:
                        resp = c.get(f"{url}/admin/v1/versions")
                        resp.raise_for_status()
                        t = time.time()
                        body = resp.json()
                        for v in body.get("versions", []):
                            if float(v.get("traffic_share", 0.0)) > 0:
                                self.observed[r].append((t, str(v["version"]), int(v.get("seq", 0))))
                    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                        self.errors += 1
                        log.debug("poll of ranker %d failed: %s", r, e)
                self._stop.wait(self.interval_s)

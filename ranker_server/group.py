"""`--workers N`: one ranker served by N processes that share its port and its device.

One Python process decodes, batches and answers a few hundred 200-candidate requests a
second (the GIL; loadtest/results/gpu_p5_servers_cuda.json), far below what one GPU
computes. So a ranker can be N worker processes, each a complete ranker that listens on
the same data port (SO_REUSEPORT: the kernel spreads connections over them), and this
supervisor, which owns everything that must stay one ranker:

- the admin API on --admin-port: every change (load, prepare, split, seq, unload) goes to
  every worker in turn, under one lock. A change some workers took and others did not
  never leaves them serving different things: the ones that failed are killed and come
  back from the group's state, not ready until then. Nothing that reached no worker
  changed anything, so its error is returned as is;
- the group's state, the desired-state file every worker starts from (`versions`,
  `split` and each version's delta seq, `deltas`, as the workers report them after each
  change), so a worker that dies or is
  killed restarts into what the others serve; one that still comes up different (it
  read the file just before a change) is restarted again;
- /healthz, /readyz (ready only when every worker is) and /metrics (every worker's, with
  a `worker` label) on the admin port;
- SIGTERM: every worker drains; the supervisor exits once they have.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from modelpack import desired
from modelpack.desired import DesiredModel
from ranker_server.config import RankerConfig
from ranker_server.lifecycle import startup_plan

log = logging.getLogger("ranker_server.group")
_RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child, before exec: a SIGKILLed supervisor's
    # workers get SIGTERM (and drain) instead of serving on, unsupervised.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    """One worker process and what the supervisor knows of it."""

    index: int
    argv: list[str]
    port_file: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    admin_port: int | None = None
    restarts: int = 0
    synced: bool = False  # its versions and split were checked against the group's
    next_start: float = 0.0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.admin_port, self.synced = None, False
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def kill(self, why: str) -> None:
        if self.running:
            assert self.proc is not None
            log.warning("worker %d (pid %d) killed: %s", self.index, self.proc.pid, why)
            self.proc.kill()

    def read_port_file(self) -> None:
        if self.admin_port is None and self.port_file.exists():
            words = self.port_file.read_text().split()
            self.admin_port = next((int(w[6:]) for w in words if w.startswith("admin=")), None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass
class Group:
    """The supervisor's state: its workers and the group state file they start from."""

    config: RankerConfig
    argv: list[str]  # the supervisor's own arguments; each worker gets them plus overrides
    data_port: int
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ranker-group-")))
    workers: list[Worker] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    draining: bool = False
    client: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=5.0))

    @property
    def state_file(self) -> Path:
        return self.workdir / "group-desired-state.json"

    @property
    def admin_timeout_s(self) -> float:
        """A worker's answer to one admin call: an unload may wait drain_timeout_s."""
        return self.config.drain_timeout_s + self.config.prepare_timeout_s + 5.0

    def start(self) -> None:
        plan = startup_plan(self.config)  # the user's desired state, else --version
        self._write_state(DesiredModel(plan.versions[0], plan.versions, plan.split,
                                       deltas=plan.deltas))
        for k in range(self.config.workers):
            argv = [sys.executable, "-m", "ranker_server", *self.argv, "--workers", "1",
                    "--group-worker", "--group-admin-port", str(self.config.admin_port),
                    "--port", str(self.data_port), "--admin-port", "0",
                    "--port-file", str(self.workdir / f"worker{k}.port"),
                    "--desired-state", str(self.state_file)]
            w = Worker(k, argv, self.workdir / f"worker{k}.port", self.workdir / f"worker{k}.log")
            w.start()
            self.workers.append(w)
        log.info("ranker group: %d workers on port %d, state in %s, logs in %s",
                 len(self.workers), self.data_port, self.state_file, self.workdir)

    def _write_state(self, model: DesiredModel) -> None:
        desired.write(self.state_file, {self.config.model: model})

    # ------------------------------------------------------------ supervision
    async def supervise(self) -> None:
        """Restart dead workers (with backoff) and check restarted ones against the group."""
        while not self.draining:
            for w in self.workers:
                if not w.running and not self.draining:
                    code = w.proc.returncode if w.proc is not None else None
                    now = time.monotonic()
                    if w.next_start == 0.0:
                        delay = _RESTART_BACKOFF_S[min(w.restarts, len(_RESTART_BACKOFF_S) - 1)]
                        w.next_start = now + delay
                        log.warning("worker %d exited (%s): restarting in %.1f s", w.index,
                                    code, delay)
                    if now >= w.next_start:
                        w.restarts, w.next_start = w.restarts + 1, 0.0
                        w.start()
                    continue
                w.read_port_file()
                if not w.synced and w.admin_port is not None:
                    await self._check_synced(w)
            await asyncio.sleep(0.1)

    async def _check_synced(self, w: Worker) -> None:
        """Once a (re)started worker is ready: same versions and split as the group, or
        killed again (it started from the state file just before a change)."""
        async with self.lock:
            try:
                ready = await self.client.get(f"{w.url}/readyz")
                if ready.status_code != 200:
                    return
                got = _model_of((await self._call(w, "GET", "/admin/v1/versions", b"",
                                                  self._auth)).body)
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                return
            want = desired.read(self.state_file).get(self.config.model)
            if want is not None and got is not None and _serves(got) == _serves(want):
                w.synced = True
                log.info("worker %d ready and in step with the group (%s)", w.index, want.split)
            else:
                w.kill(f"serves {got and got.split} while the group serves {want and want.split}")

    # ------------------------------------------------------------ admin fan-out
    async def _call(self, w: Worker, method: str, path: str, body: bytes,
                    headers: dict[str, str]) -> Reply:
        r = await self.client.request(method, f"{w.url}{path}", content=body, headers=headers,
                                      timeout=self.admin_timeout_s)
        return Reply(r.status_code, r.content, r.headers.get("content-type", "application/json"))

    async def admin(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Reply:
        """One admin call for the whole group (see the module docstring)."""
        if method == "GET":
            w = next((w for w in self.workers if w.synced and w.running), None)
            if w is None:
                return _error(503, "no worker of this ranker is ready")
            return await self._call(w, method, path, body, headers)
        async with self.lock:
            live = [w for w in self.workers if w.running and w.admin_port is not None]
            if not live:
                return _error(503, "no worker of this ranker is running")
            replies: list[Reply | None] = []
            for w in live:
                try:
                    replies.append(await self._call(w, method, path, body, headers))
                except (httpx.HTTPError, OSError) as e:
                    log.warning("worker %d: %s %s failed: %s", w.index, method, path, e)
                    replies.append(None)
            ok = [(w, r) for w, r in zip(live, replies, strict=True)
                  if r is not None and r.status < 300]
            if not ok:
                first = replies[0]
                return first if first is not None else _error(503, "no worker answered")
            await self._record(ok[0][0])
            for w, r in zip(live, replies, strict=True):
                if r is None or r.status >= 300:
                    w.kill(f"{method} {path} took on worker {ok[0][0].index} but not here "
                           f"({r.status if r else 'no answer'})")
            return ok[0][1]

    @property
    def _auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.config.admin_token()}"}

    async def _record(self, w: Worker) -> None:
        """The group's state := what worker `w` now holds and serves (it took the change)."""
        model = _model_of((await self._call(w, "GET", "/admin/v1/versions", b"",
                                            self._auth)).body)
        if model is not None:
            self._write_state(model)

    # ------------------------------------------------------------ probes
    async def readiness(self) -> tuple[bool, list[dict[str, Any]]]:
        """(every worker running, in step and ready; per-worker detail)."""
        async def one(w: Worker) -> dict[str, Any]:
            d: dict[str, Any] = {"worker": w.index, "pid": w.proc.pid if w.proc else None,
                                 "admin_port": w.admin_port, "running": w.running,
                                 "synced": w.synced,
                                 "restarts": w.restarts, "ready": False}
            if w.running and w.admin_port is not None:
                try:
                    r = await self.client.get(f"{w.url}/readyz", timeout=1.0)
                    d["ready"], d["detail"] = r.status_code == 200, r.json()
                except (httpx.HTTPError, OSError, ValueError) as e:
                    d["detail"] = str(e)
            return d

        details = list(await asyncio.gather(*(one(w) for w in self.workers)))
        ok = not self.draining and all(d["ready"] and d["synced"] for d in details)
        return ok, details

    async def metrics(self) -> list[tuple[int, str]]:
        async def one(w: Worker) -> tuple[int, str] | None:
            if not (w.running and w.admin_port is not None):
                return None
            try:
                return w.index, (await self.client.get(f"{w.url}/metrics", timeout=2.0)).text
            except (httpx.HTTPError, OSError):
                return None

        return [x for x in await asyncio.gather(*(one(w) for w in self.workers)) if x]

    async def stop(self) -> None:
        """SIGTERM every worker (each drains), wait for all, then SIGKILL stragglers."""
        self.draining = True
        for w in self.workers:
            if w.running:
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_grace_s + self.config.drain_timeout_s + 5
        while any(w.running for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self.workers:
            w.kill("still running after the drain timeout")
        await self.client.aclose()


def _serves(d: DesiredModel) -> tuple[set[str], dict[str, float], dict[str, int]]:
    """What must agree between a worker and the group: versions, split, delta seqs."""
    return set(d.versions), d.split, {v: s for v, s in d.deltas.items() if s}


def _model_of(listing: bytes) -> DesiredModel | None:
    """A worker's GET /admin/v1/versions as the group's desired state (None: serves nothing)."""
    d = json.loads(listing)
    split = {k: float(v) for k, v in (d.get("split") or {}).items()}
    if not split or d.get("active") is None:
        return None
    held = [v for v in d["versions"] if v["state"] != "unloading"]
    names = [d["active"], *sorted(v["version"] for v in held if v["version"] != d["active"])]
    return DesiredModel(d["active"], tuple(names), split,
                        {v["version"]: v["fingerprint"] for v in held},
                        deltas={v["version"]: int(v["seq"]) for v in held if v.get("seq")})


def _error(status: int, detail: str) -> Reply:
    return Reply(status, json.dumps({"detail": detail}).encode())

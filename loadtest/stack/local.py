"""A local fleet as real processes on loopback: embedding shards, a ranker, the deploy controller.

From Python (the demo, `make up`):

    with LocalStack(StackConfig(store=Path("demo_store"), run_dir=tmp)) as stack:
        httpx.post(stack.ranker_url + "/v1/rank", json=request)

Every process listens on 127.0.0.1 only. Ports are the fixed defaults of `up`
(50051.., 8080, 8090) or, with port 0, whatever the server picks (it writes the bound
port to a port file, so nothing races for a port). The admin token lives in a private
temp directory (mode 0700, file 0600); `stack.json` in the run directory records pids,
addresses and paths (loadtest/stack/state.py), so `down` can stop a detached stack from
another process. Stopping is explicit: SIGTERM to everyone (servers drain), wait,
SIGKILL what is left. The processes are loadtest.harness.process.ServerProcess, the
command lines loadtest/stack/commands.py's.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from loadtest.harness.probes import grpc_serving, http_ready, metric_sum, port_free
from loadtest.harness.process import ServerDied, ServerProcess, stop_all
from loadtest.stack.commands import (
    DEFAULT_PORTS,
    controller_args,
    fleet_json,
    ranker_args,
    shard_args,
)
from loadtest.stack.state import STATE_FILE, process_start

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A process of the stack failed to start or died; the message carries its log's tail."""


@dataclass
class StackConfig:
    """What to start; every field has a default suitable for the demo store."""

    store: Path = Path("demo_store")
    """Model store: STORE/<model>/<version>/."""
    run_dir: Path = Path("build/stack")
    """Logs, port files, fleet file, journal and stack.json go here."""
    model: str = "ads_ctr"
    """Model served."""
    version: str = "v1"
    """Version every shard preloads and the ranker activates at startup."""
    num_shards: int = 2
    """Embedding shards (must match the store's shard files)."""
    replicas: tuple[int, ...] = ()
    """Replicas per shard (default 1 each); (2, 1) gives shard 0 two replicas."""
    rankers: int = 1
    """Rankers, each reaching every replica of every shard (all in the controller's fleet)."""
    controller: bool = True
    """Also start the deploy controller."""
    fixed_ports: bool = False
    """Use the default ports (shards 50051.., ranker 8080, controller 8090) where they are free."""
    shard_extra: tuple[str, ...] = ("--drain-timeout", "10")
    """Extra flags of every embedding server."""
    ranker_extra: tuple[str, ...] = ()
    """Extra flags of the ranker (e.g. --device cpu, --max-queue 8)."""
    controller_extra: tuple[str, ...] = ()
    """Extra flags of the controller (gate thresholds, intervals)."""
    startup_timeout_s: float = 180.0
    """Longest wait for one process to become ready (the machine may be busy)."""

    def replica_counts(self) -> tuple[int, ...]:
        counts = self.replicas or (1,) * self.num_shards
        if len(counts) != self.num_shards or min(counts) < 1:
            raise ValueError(f"replicas: need one count >= 1 per shard ({self.num_shards}), "
                             f"got {counts}")
        return counts



@dataclass
class LocalStack:
    """The running fleet; `start()` brings it up, `stop()` takes it down (also on errors)."""

    config: StackConfig
    token_dir: Path | None = None
    shards: list[list[ServerProcess]] = field(default_factory=list)
    rankers: list[ServerProcess] = field(default_factory=list)
    controller: ServerProcess | None = None
    detach: bool = False
    """Start every server in its own session, so it outlives this process (`make up`)."""

    # -------------------------------------------------------------- paths

    @property
    def token_file(self) -> Path:
        if self.token_dir is None:
            raise StackError("stack not started")
        return self.token_dir / "admin.token"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def fleet_file(self) -> Path:
        return self.config.run_dir / "fleet.json"

    @property
    def journal(self) -> Path:
        return self.config.run_dir / "journal.sqlite"

    @property
    def ranker(self) -> ServerProcess | None:
        """The first ranker (the only one unless `rankers` > 1)."""
        return self.rankers[0] if self.rankers else None

    @property
    def ranker_url(self) -> str:
        if self.ranker is None:
            raise StackError("ranker not started")
        return f"http://{self.ranker.address}"

    @property
    def ranker_urls(self) -> list[str]:
        return [f"http://{r.address}" for r in self.rankers]

    @property
    def controller_url(self) -> str:
        if self.controller is None:
            raise StackError("controller not started")
        return f"http://{self.controller.address}"

    def procs(self) -> list[ServerProcess]:
        """Every started process: shards first, then the ranker and the controller."""
        return [p for _, p in self._by_module()]

    def _by_module(self) -> list[tuple[str, ServerProcess]]:
        out = [("embedding_server", p) for reps in self.shards for p in reps]
        out += [("ranker_server", r) for r in self.rankers]
        if self.controller is not None:
            out.append(("deploy_controller", self.controller))
        return out

    # -------------------------------------------------------------- lifecycle

    def _server(self, module: str, name: str, args: list[str], kind: str, offset: int = 0,
                ready: Callable[[ServerProcess], bool] | None = None) -> ServerProcess:
        return ServerProcess.module(module, *args, log_dir=self.config.run_dir, name=name,
                                    ready=ready, port=self._port(kind, offset),
                                    detach=self.detach)

    def _port(self, kind: str, offset: int = 0) -> int:
        if not self.config.fixed_ports:
            return 0
        port = DEFAULT_PORTS[kind] + offset
        if port_free(port):
            return port
        log.warning("port %d (%s) is taken; using a free port instead", port, kind)
        return 0

    def start(self) -> LocalStack:
        cfg = self.config
        counts = cfg.replica_counts()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.run_dir = cfg.run_dir.resolve()  # servers get absolute paths, whatever their cwd
        self.token_dir = Path(tempfile.mkdtemp(prefix="hes-stack-"))
        self.token_dir.chmod(0o700)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        try:
            self._start_all(counts)
        except (ServerDied, TimeoutError) as e:
            self.stop()
            raise StackError(str(e)) from None
        except BaseException:
            self.stop()
            raise
        self.write_state()
        return self

    def _start_all(self, counts: tuple[int, ...]) -> None:
        cfg = self.config
        store = cfg.store.resolve()
        t0 = time.monotonic()
        offset = 0
        for k, n in enumerate(counts):
            self.shards.append([])
            for r in range(n):  # all started before any is waited for: they load in parallel
                self.shards[k].append(self._server(
                    "embedding_server", f"shard{k}" if n == 1 else f"shard{k}r{r}",
                    shard_args(store, cfg.model, cfg.version, k, cfg.num_shards,
                               self.token_file, *cfg.shard_extra),
                    "shard", offset, grpc_serving).start())
                offset += 1
        for p in self.procs():
            p.wait_ready(cfg.startup_timeout_s)
        addrs = [[p.address for p in reps] for reps in self.shards]
        for i in range(max(1, cfg.rankers)):  # appended before waiting: stop() takes down
            self.rankers.append(self._server(  # one that never got ready
                "ranker_server", "ranker" if cfg.rankers <= 1 else f"ranker{i}",
                ranker_args(store, cfg.model, cfg.version, addrs, self.token_file,
                            *cfg.ranker_extra), "ranker", i, http_ready).start())
        for proc in self.rankers:
            proc.wait_ready(cfg.startup_timeout_s)
        self.fleet_file.write_text(fleet_json(self.ranker_urls, addrs))
        if cfg.controller:
            self.controller = self._server(
                "deploy_controller", "controller",
                controller_args(store, self.journal, self.fleet_file, self.token_file,
                                *cfg.controller_extra),
                "controller", ready=lambda s: http_ready(s, "/healthz")).start()
            self.controller.wait_ready(cfg.startup_timeout_s)
        log.info("stack up in %.1f s: rankers %s, shards %s%s", time.monotonic() - t0,
                 [r.address for r in self.rankers], addrs,
                 f", controller {self.controller.address}" if self.controller else "")

    def stop(self, timeout: float = 20.0) -> dict[str, int]:
        """Stop every process (SIGTERM, then SIGKILL after `timeout`) and remove the token."""
        procs = list(reversed(self.procs()))
        codes = dict(zip([p.name for p in procs], stop_all(procs, timeout=timeout), strict=True))
        if self.token_dir is not None:
            shutil.rmtree(self.token_dir, ignore_errors=True)
        (self.config.run_dir / STATE_FILE).unlink(missing_ok=True)
        return codes

    def write_state(self) -> None:
        """RUN_DIR/stack.json: what `python -m loadtest.stack down|status` reads."""
        state = {
            "store": str(self.config.store.resolve()), "model": self.config.model,
            "run_dir": str(self.config.run_dir.resolve()),
            "token_dir": str(self.token_dir), "token_file": str(self.token_file),
            "ranker_url": self.ranker_url if self.ranker else None,
            "controller_url": self.controller_url if self.controller else None,
            "journal": str(self.journal.resolve()),
            "processes": [{"name": p.name, "pid": p.pid, "start_time": process_start(p.pid),
                           "module": module, "address": p.address,
                           "log": str(p.log_path.resolve())}
                          for module, p in self._by_module()],
        }
        (self.config.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -------------------------------------------------------------- helpers

    def metric(self, prefix: str) -> float:
        """Sum of the ranker's /metrics samples whose line starts with `prefix`."""
        if self.ranker is None:
            raise StackError("ranker not started")
        return metric_sum(self.ranker, prefix)


# ------------------------------------------------------------------ the demo store


def ensure_store(store: Path, model: str = "ads_ctr", say: Callable[[str], None] = print) -> None:
    """Reuse the demo store if both versions verify; otherwise build it (about 80 s)."""
    from modelpack.demo import load_results

    force: list[str] = []
    try:
        if load_results(store, model) is not None:
            say(f"model store {store}: {model} v1 and v2 present, checksums verified")
            return
    except (ValueError, OSError) as e:  # VerifyError, SchemaError: a damaged store
        say(f"model store {store} does not verify ({e}); rebuilding it")
        force = ["--force"]
    say(f"building the demo model store in {store} (trains v1 and v2, ~80 s)")
    quiet = [] if sys.stdout.isatty() else ["--quiet"]  # progress bars only on a terminal
    subprocess.run([sys.executable, "-m", "modelpack", "demo", "--store", str(store), *force,
                    *quiet], check=True)

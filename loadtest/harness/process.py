"""Real server processes (tests, the local fleet, benchmarks): fail fast if they die, SIGTERM at the end.

    with ServerProcess.module("embedding_server", "--store", str(store), log_dir=tmp,
                              ready=grpc_serving) as s:      # loadtest.harness.probes
        channel = grpc.insecure_channel(s.address)

The server must accept `--port P --port-file PATH` and write its bound port as the
first line of PATH once it is ready (optional later lines: its metrics port, and
`admin=PORT` when admin is served on a port of its own, `--admin-port`). P is
0 (the server picks a free port, so nothing races for one) unless `port=` fixes it.
Several servers start in parallel with `start_all`. Output goes to a log file whose
tail is put into every failure message, so a crash explains itself. `detach=True`
puts the server in its own session, so it outlives this process (`make up`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 90.0


class ServerDied(RuntimeError):
    """The server process exited while its caller was waiting for it."""


class ServerProcess:
    """One server subprocess; use as a context manager or call start/wait_ready/stop."""

    def __init__(self, argv: Sequence[str], *, log_dir: Path, name: str = "server",
                 env: dict[str, str] | None = None,
                 ready: Callable[[ServerProcess], bool] | None = None, port: int = 0,
                 detach: bool = False) -> None:
        self.name = name
        self.port_file = log_dir / f"{name}.port"
        self.log_path = log_dir / f"{name}.log"
        self.argv = [*argv, "--port", str(port), "--port-file", str(self.port_file)]
        self.env = {**os.environ, **(env or {})}
        self.ready = ready
        self.detach = detach
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        """The bound port, known once wait_ready() returned."""
        self.metrics_port: int | None = None
        self.admin_port: int | None = None
        """The admin listener's port (`admin=` line), or None when admin shares `port`."""
        self.started_at = 0.0
        """time.monotonic() at start()."""
        self.ready_s = 0.0
        """Seconds from start() until ready (for benchmarks' startup figures)."""
        self._log: IO[bytes] | None = None

    @classmethod
    def module(cls, module: str, *args: str, log_dir: Path, name: str | None = None,
               env: dict[str, str] | None = None,
               ready: Callable[[ServerProcess], bool] | None = None, port: int = 0,
               detach: bool = False) -> ServerProcess:
        """`python -m module args...` with this interpreter."""
        return cls([sys.executable, "-m", module, *args], log_dir=log_dir,
                   name=name or module.replace(".", "_"), env=env, ready=ready, port=port,
                   detach=detach)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self) -> ServerProcess:
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop(), outlives this call)
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=self.detach)
        log.debug("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise ServerDied (with the log's tail) if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerDied(f"{self.name} exited with {self.proc.returncode}; "
                             f"log {self.log_path}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = _STARTUP_TIMEOUT_S) -> ServerProcess:
        """Until the port file names the port and `ready` passes: ServerDied if the process
        exits meanwhile, TimeoutError (after a SIGKILL) past `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if self.port_file.exists():
                words = self.port_file.read_text().split()
                admin = [int(w[6:]) for w in words if w.startswith("admin=")]
                lines = [w for w in words if not w.startswith("admin=")]
                self.port = int(lines[0])
                self.metrics_port = int(lines[1]) if len(lines) > 1 else None
                self.admin_port = admin[0] if admin else None
                if self.ready is None or self.ready(self):
                    self.ready_s = time.monotonic() - self.started_at
                    return self
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.05)

    def send(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` if the process still runs (stop() then waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after `timeout` seconds."""
        assert self.proc is not None, f"{self.name} was never started"
        try:
            return self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait (SIGKILL after `timeout`); returns the exit code."""
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if self.wait(timeout) is None:
                log.warning("%s (pid %d) still running %.0f s after signal %d; sending SIGKILL",
                            self.name, self.proc.pid, timeout, sig)
                self.proc.kill()
                self.proc.wait()
        self.close_log()
        return self.proc.returncode

    def close_log(self) -> None:
        """Close this side's log handle (a detached server keeps its own)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start().wait_ready()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_all(servers: Iterable[ServerProcess]) -> list[ServerProcess]:
    """Start several servers at once and wait for all; on failure stop every one."""
    started = [s.start() for s in servers]
    try:
        for s in started:
            s.wait_ready()
    except BaseException:
        for s in started:
            s.stop(signal.SIGKILL)
        raise
    return started


def stop_all(servers: Iterable[ServerProcess], sig: int = signal.SIGTERM,
             timeout: float = 30.0) -> list[int]:
    """Signal every server first, then wait for each: they shut down in parallel.

    Whatever still runs `timeout` seconds after the signal (all together) gets SIGKILL.
    """
    servers = list(servers)
    for s in servers:
        s.send(sig)
    deadline = time.monotonic() + timeout
    return [s.stop(sig, deadline - time.monotonic()) for s in servers]

"""--workers N: N server processes behind one port (SO_REUSEPORT), one supervisor.

Python serves about one core per process, so more cores need more processes. The
supervisor picks the port (holding it bound, not listening, until the workers are up,
so nothing else takes it), starts the children with PROMETHEUS_MULTIPROC_DIR and a peer
directory set, serves the merged /metrics, writes the port file once every child is
SERVING, and on SIGTERM forwards it and waits: children finish in-flight work within the
grace period, stragglers are killed after it. If a child dies on its own, the others are
stopped and the supervisor exits 1, so the orchestrator restarts a whole, consistent set.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from embedding_server.config import ServerConfig, worker_argv
from embedding_server.runtime import setup_logging, stop_event, write_port_file

log = logging.getLogger("embedding_server.workers")
_START_TIMEOUT_S = 600.0  # preloading a large version verifies every checksum first


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port with SO_REUSEPORT; the kernel never routes to it."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    return s


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the supervisor dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux/glibc: children then rely on the supervisor's own cleanup


def _stop_children(children: list[subprocess.Popen[bytes]], grace_s: float) -> bool:
    """SIGTERM, wait up to grace + 5 s, SIGKILL the rest; True if all exited 0."""
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 5.0
    ok = True
    for c in children:
        try:
            c.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop within the grace period; killing it", c.pid)
            c.kill()
            c.wait()
        ok = ok and c.returncode == 0
    return ok


def supervise(cfg: ServerConfig) -> int:
    """Run cfg.workers children until SIGTERM/SIGINT; returns the exit code."""
    setup_logging(cfg.log_level)
    stop = stop_event("stopping workers")
    run_dir = Path(tempfile.mkdtemp(prefix="embedding-server-"))
    peer_dir, prom_dir = run_dir / "peers", run_dir / "prometheus"
    peer_dir.mkdir()
    prom_dir.mkdir()
    # Before prometheus_client is used here or in a child: values go to per-process files.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    held = reserve_port(cfg.host, cfg.port)
    port = int(held.getsockname()[1])
    # --admin-port 0 is resolved here too, so that every worker binds the same one.
    held_admin = reserve_port(cfg.host, cfg.admin_port) if cfg.admin_port is not None else None
    admin_port = int(held_admin.getsockname()[1]) if held_admin is not None else None
    children: list[subprocess.Popen[bytes]] = []
    try:
        cmd = [sys.executable, "-m", "embedding_server",
               *worker_argv(replace(cfg, admin_port=admin_port), port, peer_dir)]
        # No threads run yet in this process, so preexec_fn is safe here.
        children = [subprocess.Popen(cmd, preexec_fn=_die_with_parent) for _ in range(cfg.workers)]
        deadline = time.monotonic() + _START_TIMEOUT_S
        while len(list(peer_dir.glob("worker-*.addr"))) < cfg.workers:
            dead = [c for c in children if c.poll() is not None]
            if dead or stop.is_set() or time.monotonic() > deadline:
                if dead:
                    log.error("worker %d exited with %s during startup", dead[0].pid, dead[0].returncode)
                _stop_children(children, 0.0)
                return 0 if stop.is_set() and not dead else 1
            time.sleep(0.05)
        held.close()
        if held_admin is not None:
            held_admin.close()
        from embedding_server.metrics import multiprocess_registry, serve_metrics

        metrics_port = None
        if cfg.metrics_port is not None:
            metrics_port = serve_metrics(cfg.host, cfg.metrics_port, multiprocess_registry())
            log.info("merged metrics of %d workers on http://%s:%d/metrics", cfg.workers, cfg.host,
                     metrics_port)
        if cfg.port_file is not None:
            write_port_file(cfg.port_file, port, metrics_port, admin_port)
        log.info("%d workers SERVING on %s:%d", cfg.workers, cfg.host, port)
        while not stop.wait(0.2):
            dead = [c for c in children if c.poll() is not None]
            if dead:
                log.error("worker %d exited with %s; stopping the others", dead[0].pid,
                          dead[0].returncode)
                _stop_children(children, cfg.grace_period_s)
                return 1
        return 0 if _stop_children(children, cfg.grace_period_s) else 1
    finally:
        held.close()
        if held_admin is not None:
            held_admin.close()
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        shutil.rmtree(run_dir, ignore_errors=True)

"""A local fleet as real processes on loopback: embedding shards, a ranker, the deploy controller.

    python -m loadtest.stack up   [--store demo_store] [--run-dir build/stack]  # detached; prints curl
    . build/stack/env                                                           # its URLs and token
    python -m loadtest.stack down [--run-dir build/stack]                       # SIGTERM, then SIGKILL
    python -m loadtest.stack status [--run-dir build/stack]

From Python (the demo, the e2e tests):

    with LocalStack(StackConfig(store=Path("demo_store"), run_dir=tmp)) as stack:
        httpx.post(stack.ranker_url + "/v1/rank", json=request)

Every process listens on 127.0.0.1 only. Ports are the fixed defaults of `up`
(50051.., 8080, 8090) or, with port 0, whatever the server picks (it writes the bound
port to a port file, so nothing races for a port). The admin token lives in a private
temp directory (mode 0700, file 0600); `stack.json` in the run directory records pids,
addresses and paths, so `down` can stop a detached stack from another process. Stopping
is explicit: SIGTERM to everyone (servers drain), wait, SIGKILL what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STATE_FILE = "stack.json"
ENV_FILE = "env"
EMBEDDING_SERVICE = "hybrid.embedding.v1.EmbeddingService"
DEFAULT_PORTS = {"shard": 50051, "ranker": 8080, "controller": 8090}


class StackError(RuntimeError):
    """A process of the stack failed to start or died; the message carries its log's tail."""


# ------------------------------------------------------------------ readiness probes


def http_ready(address: str, path: str = "/readyz", timeout: float = 1.0) -> bool:
    """True once GET http://address/path answers 200."""
    import httpx

    try:
        return httpx.get(f"http://{address}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """True once the embedding server's gRPC health service says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=EMBEDDING_SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ command lines


def shard_args(store: Path, model: str, version: str, shard: int, num_shards: int,
               token_file: Path, *extra: str) -> list[str]:
    """Arguments of `python -m embedding_server` for one replica of shard `shard`."""
    return ["--store", str(store), "--shard", str(shard), "--num-shards", str(num_shards),
            "--preload", f"{model}/{version}", "--admin-token-file", str(token_file),
            "--host", LOOPBACK, *extra]


def ranker_args(store: Path, model: str, version: str, shards: Sequence[Sequence[str]],
                token_file: Path, *extra: str) -> list[str]:
    """Arguments of `python -m ranker_server`; `shards[k]` = replica addresses of shard k."""
    spec = ",".join("|".join(reps) for reps in shards)
    return ["--store", str(store), "--model", model, "--version", version,
            "--embedding-shards", spec, "--admin-token-file", str(token_file),
            "--host", LOOPBACK, *extra]


def controller_args(store: Path, journal: Path, fleet_file: Path, token_file: Path,
                    *extra: str) -> list[str]:
    """Arguments of `python -m deploy_controller` with local discovery."""
    return ["--journal", str(journal), "--admin-token-file", str(token_file),
            "--discovery", "local", "--fleet", str(fleet_file), "--store", str(store),
            "--host", LOOPBACK, *extra]


def fleet_json(ranker_urls: Sequence[str], shards: Sequence[Sequence[str]]) -> str:
    """The controller's fleet file (deploy_controller/discovery.py)."""
    return json.dumps({"rankers": list(ranker_urls),
                       "embedding_shards": [list(reps) for reps in shards]}, indent=2)


# ------------------------------------------------------------------ one process


class Proc:
    """One server subprocess (`python -m module args --port P --port-file F`), logged to a file."""

    def __init__(self, name: str, module: str, args: Sequence[str], run_dir: Path, *,
                 port: int = 0, ready: Callable[[str], bool] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.module, self.run_dir = name, module, run_dir
        self.port_file = run_dir / f"{name}.port"
        self.log_path = run_dir / f"{name}.log"
        self.argv = [sys.executable, "-m", module, *args, "--port", str(port),
                     "--port-file", str(self.port_file)]
        self.ready = ready
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise StackError(f"{self.name} was never started")
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, *, detach: bool = False) -> Proc:
        """Start it; `detach` puts it in its own session so it outlives this process."""
        self.port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=detach)
        log.debug("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> Proc:
        """Until the port file exists and the probe passes; StackError if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with {self.proc.returncode}; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            if self.port_file.exists():
                text = self.port_file.read_text().split()
                if text:
                    self.port = int(text[0])
                    if self.ready is None or self.ready(self.address):
                        return self
            if time.monotonic() > deadline:
                raise StackError(f"{self.name} not ready after {timeout:.0f} s; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after `timeout`."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_procs(procs: Sequence[Proc], timeout: float = 20.0) -> dict[str, int | None]:
    """SIGTERM every process at once, wait up to `timeout`, SIGKILL the rest; exit codes."""
    for p in procs:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int | None] = {}
    for p in procs:
        code = p.wait(deadline - time.monotonic())
        if code is None and p.alive():
            log.warning("%s did not exit %.0f s after SIGTERM; sending SIGKILL", p.name, timeout)
            p.signal(signal.SIGKILL)
            code = p.wait(10.0)
        codes[p.name] = code
        p.close_log()
    return codes


# ------------------------------------------------------------------ the stack


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
    shards: list[list[Proc]] = field(default_factory=list)
    ranker: Proc | None = None
    controller: Proc | None = None
    detach: bool = False

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
    def ranker_url(self) -> str:
        if self.ranker is None:
            raise StackError("ranker not started")
        return f"http://{self.ranker.address}"

    @property
    def controller_url(self) -> str:
        if self.controller is None:
            raise StackError("controller not started")
        return f"http://{self.controller.address}"

    def procs(self) -> list[Proc]:
        out = [p for reps in self.shards for p in reps]
        out += [p for p in (self.ranker, self.controller) if p is not None]
        return out

    # -------------------------------------------------------------- lifecycle

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
            reps = []
            for r in range(n):
                name = f"shard{k}" if n == 1 else f"shard{k}r{r}"
                reps.append(Proc(name, "embedding_server",
                                 shard_args(store, cfg.model, cfg.version, k, cfg.num_shards,
                                            self.token_file, *cfg.shard_extra),
                                 cfg.run_dir, port=self._port("shard", offset), ready=grpc_serving))
                offset += 1
            self.shards.append(reps)
        for p in self.procs():
            p.start(detach=self.detach)
        for p in self.procs():
            p.wait_ready(cfg.startup_timeout_s)
        addrs = [[p.address for p in reps] for reps in self.shards]
        self.ranker = Proc("ranker", "ranker_server",
                           ranker_args(store, cfg.model, cfg.version, addrs, self.token_file,
                                       *cfg.ranker_extra),
                           cfg.run_dir, port=self._port("ranker"), ready=http_ready)
        self.ranker.start(detach=self.detach).wait_ready(cfg.startup_timeout_s)
        self.fleet_file.write_text(fleet_json([self.ranker_url], addrs))
        if cfg.controller:
            self.controller = Proc(
                "controller", "deploy_controller",
                controller_args(store, self.journal, self.fleet_file, self.token_file,
                                *cfg.controller_extra),
                cfg.run_dir, port=self._port("controller"),
                ready=lambda a: http_ready(a, "/healthz"))
            self.controller.start(detach=self.detach).wait_ready(cfg.startup_timeout_s)
        log.info("stack up in %.1f s: ranker %s, shards %s%s", time.monotonic() - t0,
                 self.ranker.address, addrs,
                 f", controller {self.controller.address}" if self.controller else "")

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        """Stop every process (SIGTERM, then SIGKILL after `timeout`) and remove the token."""
        codes = stop_procs(list(reversed(self.procs())), timeout)
        if self.token_dir is not None:
            shutil.rmtree(self.token_dir, ignore_errors=True)
        (self.config.run_dir / STATE_FILE).unlink(missing_ok=True)
        return codes

    def write_state(self) -> None:
        state = {
            "store": str(self.config.store.resolve()), "model": self.config.model,
            "run_dir": str(self.config.run_dir.resolve()),
            "token_dir": str(self.token_dir), "token_file": str(self.token_file),
            "ranker_url": self.ranker_url if self.ranker else None,
            "controller_url": self.controller_url if self.controller else None,
            "journal": str(self.journal.resolve()),
            "processes": [{"name": p.name, "pid": p.pid, "start_time": process_start(p.pid),
                           "module": p.module, "address": p.address,
                           "log": str(p.log_path.resolve())}
                          for p in self.procs()],
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
        import httpx

        text = httpx.get(f"{self.ranker_url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix))


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


# ------------------------------------------------------------------ detached stacks (up / down)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], fields[19]


def process_start(pid: int) -> str:
    """The process's start time as the kernel has it: with the pid, it names one process."""
    st = _proc_stat(pid)
    return st[1] if st is not None else ""


def still_running(proc: dict[str, Any]) -> bool:
    """Is the recorded process still running, and still the one we started (no reused pid)?"""
    st = _proc_stat(int(proc["pid"]))
    return st is not None and st[0] != "Z" and st[1] == proc.get("start_time")


def down(run_dir: Path, timeout: float = 20.0) -> int:
    """Stop the stack recorded in `run_dir/stack.json`; returns how many processes were stopped."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        print(f"no stack recorded in {state_path}; nothing to stop")
        return 0
    state: dict[str, Any] = json.loads(state_path.read_text())
    procs = [p for p in reversed(state["processes"]) if still_running(p)]
    if not procs:
        print(f"no process of the stack recorded in {state_path} is still running")
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(p["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        pid = int(p["pid"])
        while still_running(p) and time.monotonic() < deadline:
            time.sleep(0.1)
        if still_running(p):
            log.warning("%s (pid %d) still running after SIGTERM; sending SIGKILL", p["name"], pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"stopped {p['name']} (pid {pid})")
    shutil.rmtree(state["token_dir"], ignore_errors=True)
    state_path.unlink(missing_ok=True)
    (run_dir / ENV_FILE).unlink(missing_ok=True)
    return len(procs)


def env_text(state: dict[str, Any]) -> str:
    """Shell exports for a running stack; the token is read from its file when sourced."""
    shards = [p["address"] for p in state["processes"] if p["module"] == "embedding_server"]
    lines = [f"export RANKER_URL={shlex.quote(state['ranker_url'])}",
             f"export DEPLOYCTL_CONTROLLER={shlex.quote(state['controller_url'])}",
             f"export DEPLOYCTL_TOKEN=\"$(cat {shlex.quote(state['token_file'])})\""]
    lines += [f"export SHARD{k}={a}" for k, a in enumerate(shards)]
    return "\n".join(lines) + "\n"


def usage_text(state: dict[str, Any], eval_file: Path, env_file: Path) -> str:
    """What a person can do with a running stack, as commands that work when pasted."""
    lines = [
        f"ranker      {state['ranker_url']}   (/v1/rank, /readyz, /metrics)",
        f"controller  {state['controller_url']}   (deployctl)",
        f"logs        {state['run_dir']}/*.log",
        "",
        f"  . {env_file}    # RANKER_URL, DEPLOYCTL_CONTROLLER, DEPLOYCTL_TOKEN, SHARD0..",
        f"  head -1 {eval_file} | curl -s -H 'content-type: application/json' "
        "--data-binary @- \"$RANKER_URL/v1/rank\"",
        "  .venv/bin/deployctl rollout ads_ctr v2 --canary 10,50,100 --bake 10",
        "  .venv/bin/locust -f loadtest/locust/locustfile.py --headless -u 8 -r 8 --run-time 30s "
        f"--host \"$RANKER_URL\" --eval {eval_file}",
        "  make down",
    ]
    return "\n".join(lines)


def _existing(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    alive = [p for p in state["processes"] if still_running(p)]
    return state if alive else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m loadtest.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--store", type=Path, default=Path("demo_store"), help="model store")
    p.add_argument("--run-dir", type=Path, default=Path("build/stack"),
                   help="logs, pids (stack.json), fleet file, journal")
    p.add_argument("--version", default="v1", help="version served at startup")
    p.add_argument("--free-ports", action="store_true",
                   help="let every server pick a free port instead of 50051.., 8080, 8090")
    args = p.parse_args(argv)
    if args.command == "down":
        down(args.run_dir)
        return 0
    existing = _existing(args.run_dir)
    if args.command == "status":
        if existing is None:
            print(f"no stack running from {args.run_dir}")
            return 1
        for proc in existing["processes"]:
            up = still_running(proc)
            print(f"{proc['name']:<12} pid {proc['pid']:<8} {proc['address']:<22} "
                  f"{'running' if up else 'GONE'}")
        return 0
    eval_file = args.store / "ads_ctr" / args.version / "eval.jsonl"
    env_file = args.run_dir / ENV_FILE
    if existing is not None:
        gone = [p["name"] for p in existing["processes"] if not still_running(p)]
        if gone:
            print(f"the stack in {args.run_dir} is broken ({', '.join(gone)} exited; logs in "
                  f"{args.run_dir}): run `make down`, then `make up` again", file=sys.stderr)
            return 1
        print(f"a stack is already running from {args.run_dir}:\n")
        print(usage_text(existing, eval_file, env_file))
        return 0
    try:
        ensure_store(args.store)
    except subprocess.CalledProcessError as e:
        print(f"error: building the demo store failed ({e})", file=sys.stderr)
        return 1
    stack = LocalStack(StackConfig(store=args.store, run_dir=args.run_dir, version=args.version,
                                   fixed_ports=not args.free_ports,
                                   controller_extra=("--gate-interval-s", "2")), detach=True)
    try:
        stack.start()
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for proc in stack.procs():
        proc.close_log()  # the detached children keep their own handles
    state = json.loads((args.run_dir / STATE_FILE).read_text())
    env_file.write_text(env_text(state))
    print(usage_text(state, eval_file, env_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())

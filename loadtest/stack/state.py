"""A detached stack's record (`RUN_DIR/stack.json`, `RUN_DIR/env`) and how to stop it from anywhere.

`make up` starts the fleet detached and exits; `make down` runs in another process.
stack.json names every process by pid *and* kernel start time, so `down` never signals
a process that merely reuses a recorded pid. A server restarted by hand with its original
command line is not in stack.json, but its `--port-file` still lies in the run directory:
`down` finds such processes in /proc and stops them too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shlex
import shutil
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
ENV_FILE = "env"


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


def _port_file(pid: int) -> Path | None:
    """The absolute --port-file a process was started with, None if it has none (or is gone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"--port-file":
            return (cwd / os.fsdecode(value)).resolve()
    return None


def strays(run_dir: Path, known: set[int]) -> list[int]:
    """Pids not in `known` whose --port-file lies in `run_dir`: servers restarted by hand."""
    here = run_dir.resolve()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in known and int(entry.name) != os.getpid():
            port_file = _port_file(int(entry.name))
            if port_file is not None and port_file.parent == here:
                out.append(int(entry.name))
    return sorted(out)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The recorded stack if any of its processes still runs, else None."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state if any(still_running(p) for p in state["processes"]) else None


def down(run_dir: Path, timeout: float = 20.0) -> int:
    """Stop the stack recorded in `run_dir/stack.json`; returns how many processes were stopped."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        print(f"no stack recorded in {state_path}; nothing to stop")
        return 0
    state: dict[str, Any] = json.loads(state_path.read_text())
    procs = [p for p in reversed(state["processes"]) if still_running(p)]
    for pid in strays(run_dir, {int(p["pid"]) for p in state["processes"]}):
        port_file = _port_file(pid)
        name = port_file.stem if port_file is not None else "server"
        procs.append({"name": f"{name} (restarted by hand)", "pid": pid,
                      "start_time": process_start(pid)})
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

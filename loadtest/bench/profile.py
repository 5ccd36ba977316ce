"""py-spy profiling of a server under load (embedding server, ranker), folded into categories."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- profiling


def profile_server(pid: int, seconds: float, out: Path, load: Callable[[], None],
                   native: bool = True) -> dict[str, Any]:
    """py-spy record the server while `load()` runs; summarize the hottest frames.

    native: C frames too (grpc core, torch, FBGEMM, libc), which needs py-spy to pause
    the process for every sample, so the rate is low; otherwise `--gil --nonblocking`:
    only the thread holding the GIL, i.e. where the Python time goes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not found"}
    argv = [spy, "record", "--pid", str(pid), "--rate", "100" if native else "500",
            "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)]
    argv += ["--native"] if native else ["--gil", "--nonblocking"]
    proc = subprocess.Popen([*argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    try:
        load()
    finally:
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if proc.returncode != 0 or not out.exists():
        return {"error": f"py-spy exited {proc.returncode}: {err.decode(errors='replace')[-500:]}"}
    summary = summarize_collapsed(out.read_text())
    summary["mode"] = "native (all threads, idle dropped)" if native else "GIL holder only (--gil)"
    return summary


def _frame(f: str) -> str:
    f = re.sub(r":\d+\)$", ")", f.strip())
    return re.sub(r"\(.*/(site-packages|lib/python3\.\d+)/", "(", f)


_IDLE = ("PyThread_acquire_lock_timed", "_queue_SimpleQueue_get", "epoll_wait")
_GIL_WAIT = ("pthread_cond_timedwait", "pthread_cond_wait", "take_gil")
# Where an active sample's time goes: the innermost frame that matches a category wins.
_CATEGORIES = (
    ("kernel: the gather (np.take, torch index_select) / FBGEMM",
     ("PyArray_TakeFrom", "index_select", "fbgemm", "int_nbit_split", "torch/_ops")),
    ("socket syscalls (sendmsg/recvmsg/write/eventfd)",
     ("sendmsg", "recvmsg", "write (libc", "eventfd", "read (libc", "syscall (libc")),
    ("protobuf (upb) parse/build/serialize", ("PyUpb", "upb_", "_message.abi3")),
    ("numpy (tobytes, min/max/diff checks)", ("numpy/", "_multiarray_umath")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("embedding_server Python (servicer, validation, version acquire)", ("embedding_server/",)),
    ("grpc Python/Cython server layer", ("grpc/",)),
)


def categorize(frames: Sequence[str]) -> str:
    """The category of one stack (innermost frame last)."""
    named = [f for f in frames if not re.match(r"0x[0-9a-f]+ ", f)]
    if named and any(m in named[-1] for m in _GIL_WAIT):
        return "GIL / lock wait (thread hand-offs on one core)"
    for f in reversed(frames):
        for name, marks in _CATEGORIES:
            if any(m in f for m in marks):
                return name
    return "other (Python interpreter, libc)"


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Active-sample shares from py-spy's collapsed ('raw') output: by category, by innermost
    named frame, and by Python function (inclusive), plus the most frequent stacks. Idle
    threads (blocked on a queue, a threading lock or epoll) are dropped; waiting for the
    GIL counts as active."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    stacks: Counter[str] = Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(m in frames[-1] for m in _IDLE) or any(
                m in f for f in frames[-4:] for m in _IDLE[:2]):
            idle += n
            continue
        total += n
        named = [f for f in frames if not re.match(r"0x[0-9a-f]+ ", f)]
        leaf[(named[-1] if named else frames[-1])[:140]] += n
        for f in {f for f in frames if ".py)" in f}:
            incl[f] += n
        cats[categorize(frames)] += n
        stacks[";".join(f if len(f) <= 90 else f[:87] + "..." for f in named[-8:])] += n

    def share(c: Counter[str], k: int = top) -> list[dict[str, Any]]:
        return [{"frame": f, "share": round(v / total, 4)} for f, v in c.most_common(k)] if total else []

    return {"active_samples": total, "idle_samples": idle,
            "categories": {k: round(v / total, 4) for k, v in cats.most_common()} if total else {},
            "top_innermost": share(leaf), "top_python_inclusive": share(incl),
            "top_stacks_innermost_8_frames": [{"stack": st, "samples": v}
                                              for st, v in stacks.most_common(25)]}


# --------------------------------------------------------------------------- the ranker

# Leaf frames where a ranker thread only waits (py-spy's idle detection misses these).
_RANKER_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "Thread.run (threading.py",
                       "EpollSelector.select (selectors.py", "Condition.wait (threading.py",
                       "Event.wait (threading.py")
_UVLOOP_LEAVES = ("Runner.run (asyncio/runners.py", "run (uvloop/")
# Where a ranker sample's time goes: the first category (in this order) any frame matches.
_RANKER_CATEGORIES = (
    ("dequantize + pool + dense forward (compute thread)", ("forward (ranker_server/pipeline.py",)),
    ("stage inputs and rows (stage thread)", ("stage_inputs (ranker_server/pipeline.py",
                                              "stage_rows (ranker_server/pipeline.py")),
    ("protobuf decode + validate (codec)", ("(ranker_server/codec.py",)),
    ("hash IDs / plan rows / merge", ("plan_lookups (", "merge_requests (")),
    ("gRPC lookup client", ("(embedding_server/client.py", "(grpc/", "(ranker_server/remote_tables.py")),
    ("batcher + pipeline glue", ("(ranker_server/batcher.py", "(ranker_server/pipeline.py")),
    ("metrics", ("(prometheus_client/",)),
    ("rank handler (api.py, own lines)", ("rank (ranker_server/api.py",)),
    ("HTTP server + ASGI framework (uvicorn, h11, starlette, fastapi)",
     ("(uvicorn/", "(h11/", "(starlette/", "(fastapi/")),
    ("asyncio event loop", ("(asyncio/",)),
)


def ranker_category(frames: Sequence[str]) -> str:
    """The pipeline stage of one ranker stack (outermost frame first)."""
    if frames[-1].startswith(_RANKER_IDLE_LEAVES):
        return "idle (waiting for work)"
    if frames[-1].startswith(_UVLOOP_LEAVES):  # uvloop's own C: sockets and epoll, any stack
        return "event loop (uvloop C: socket I/O, epoll)"
    for name, needles in _RANKER_CATEGORIES:
        if any(n in fr for fr in frames for n in needles):
            return name
    return "other"


def profile_ranker(pid: int, seconds: float, raw: Path) -> dict[str, Any]:
    """py-spy the ranker's Python threads for `seconds` (the caller keeps it loaded): shares
    of the samples by pipeline stage, by thread, by innermost and inclusive frame."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
           "--threads", "--format", "raw", "--output", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {proc.stderr[-800:]}"}
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count, frames = int(n), stack.split(";")
        total += count
        threads[frames[0]] += count
        cats[ranker_category(frames[1:])] += count
        self_c[frames[-1]] += count
        for fr in set(frames[1:]):
            incl[fr] += count

    def top(c: Counter[str], k: int = 20) -> list[dict[str, Any]]:
        return [{"frame": f, "share": v / total} for f, v in c.most_common(k)]

    busy = total - cats["idle (waiting for work)"]
    return {"samples": total, "rate_hz": 100, "seconds": seconds, "categories": top(cats, 20),
            "categories_share_of_busy": {k: v / busy for k, v in cats.most_common()
                                         if not k.startswith("idle")} if busy else {},
            "threads": top(threads, 8), "top_self": top(self_c, 25), "top_inclusive": top(incl, 40)}

"""What /proc says about a process: CPU seconds, children, memory, disk reads; CPU pinning.

The benchmarks judge contention-robust figures (work per CPU-second of the serving
process) beside wall-clock ones, because the machines they run on are shared. Linux only;
every reader degrades to "nothing" for a process that has just exited.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
from pathlib import Path
from typing import Any

_SMAPS_LINE = re.compile(r"(\w+):\s+(\d+) kB")


def loadavg() -> list[float]:
    """os.getloadavg(), rounded: recorded beside every measurement on a shared machine."""
    return [round(x, 2) for x in os.getloadavg()]


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User + system CPU seconds of `pid` (all threads) and, by default, its live children."""
    total = 0.0
    for p in [pid, *(child_pids(pid) if children else [])]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def self_cpu_seconds() -> float:
    """This process's own user + system CPU seconds (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def disk_read_bytes(pid: int) -> int:
    """Bytes `pid` made the storage layer read (page-cache hits do not count)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes (Rss, Pss, Private_Dirty, Anonymous, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        m = _SMAPS_LINE.match(line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def private_memory(pid: int) -> dict[str, Any]:
    """smaps_rollup in MB, the non-file-backed private figure, and which mappings hold it."""
    roll = smaps_rollup(pid)
    mb = {k: round(v / 1e6, 1) for k, v in roll.items()
          if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous", "Shared_Clean",
                   "Pss_Anon", "Pss_File")}
    anon: dict[str, int] = {}
    dirty: dict[str, int] = {}
    name = "?"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                name = Path(parts[5]).name if len(parts) > 5 else "[anon]"
            elif line.startswith("Anonymous:"):
                anon[name] = anon.get(name, 0) + int(line.split()[1]) * 1024
            elif line.startswith("Private_Dirty:"):
                dirty[name] = dirty.get(name, 0) + int(line.split()[1]) * 1024
    # Anonymous pages are (nearly all) private dirty too: per mapping, the larger of the two.
    per = {n: max(anon.get(n, 0), dirty.get(n, 0)) for n in {*anon, *dirty}}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
    private = max(roll.get("Private_Dirty", 0), roll.get("Anonymous", 0))
    return {"private_non_file_MB": round(private / 1e6, 1), "smaps_rollup_MB": mb,
            "largest_private_mappings_MB": {k: round(v / 1e6, 1) for k, v in top}}


def _all_cpus() -> set[int]:
    return set(range(os.cpu_count() or 1))


def pin(cpus: set[int] | None) -> None:
    """Pin the calling thread (and threads it starts later) to `cpus`; None = all CPUs."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus if cpus is not None else _all_cpus())


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of `pid` and of its children to `cpus`; None = all CPUs."""
    cpus = cpus if cpus is not None else _all_cpus()
    for p in [pid, *child_pids(pid)]:
        tasks = Path(f"/proc/{p}/task")
        for tid in os.listdir(tasks) if tasks.is_dir() else []:
            with contextlib.suppress(OSError):  # the thread just exited
                os.sched_setaffinity(int(tid), cpus)

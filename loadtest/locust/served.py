"""Load-test helpers that do not import Locust (so the demo, the report and tests can use them).

- `check_loopback`: load scripts target loopback only unless explicitly allowed;
- `slo_problems`: the SLO verdict of a run (failure ratio, p99, a minimum of requests);
- `ServedLog`: one row per answered request (start time, latency, status, version) plus
  each version's scores against the eval labels, for traffic shares and served AUC;
- `auc`, `percentile`, `step_at` (the step shape's schedule), and readers for the files
  the Locust scripts write.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
REQUEST_LOG_COLUMNS = ("t", "latency_ms", "status", "version", "kind")


class RemoteTargetError(ValueError):
    """A load script was pointed at a host that is not loopback."""


def target_host(target: str) -> str:
    """The host name of `http://h:p/...`, `h:p`, `[::1]:p`, `ipv4:h:p` or `dns:///h:p`."""
    t = target.strip()
    if t.startswith("dns:///"):
        t = t[len("dns:///"):]
    elif t.startswith(("ipv4:", "ipv6:")):
        t = t.split(":", 1)[1].split(",", 1)[0]
    if "://" not in t:
        t = "//" + t
    host = urlsplit(t).hostname
    return (host or "").lower()


def check_loopback(target: str | None, allow_remote: bool = False) -> None:
    """Raise RemoteTargetError unless `target` is on loopback (or `allow_remote`)."""
    if allow_remote:
        return
    if not target:
        raise RemoteTargetError("no target host given (use --host http://127.0.0.1:PORT)")
    host = target_host(target)
    if host not in LOOPBACK_HOSTS:
        raise RemoteTargetError(
            f"refusing to load {target!r}: host {host!r} is not loopback "
            f"({', '.join(sorted(LOOPBACK_HOSTS))}); pass --allow-remote if you really mean it")


def slo_problems(num_requests: int, num_failures: int, p99_ms: float | None, *,
                 max_failure_ratio: float, max_p99_ms: float, min_requests: int = 1) -> list[str]:
    """Why a run breaks its SLO (empty: it meets it). A limit <= 0 is not checked."""
    out = []
    if num_requests < min_requests:
        out.append(f"only {num_requests} requests (SLO needs at least {min_requests})")
        return out
    ratio = num_failures / num_requests if num_requests else 0.0
    if max_failure_ratio >= 0 and ratio > max_failure_ratio:
        out.append(f"failure ratio {ratio:.4f} ({num_failures}/{num_requests}) > "
                   f"{max_failure_ratio:.4f}")
    if max_p99_ms > 0 and p99_ms is not None and p99_ms > max_p99_ms:
        out.append(f"p99 {p99_ms:.0f} ms > {max_p99_ms:.0f} ms")
    return out


def step_at(run_time: float, users: int, seconds: float, steps: int) -> int | None:
    """Users a step load wants `run_time` seconds in, or None once its last step is over."""
    if users <= 0 or seconds <= 0 or steps <= 0:
        raise ValueError(f"step shape needs positive users/seconds/steps, got "
                         f"{users}/{seconds}/{steps}")
    step = int(run_time // seconds)
    return None if step >= steps else (step + 1) * users


def auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """ROC AUC (Mann-Whitney, ties counted half); NaN when one class is missing."""
    y = np.asarray(labels, dtype=np.float64).ravel() > 0.5
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct score: ties share the mean of their ranks.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def percentile(values: Sequence[float] | npt.NDArray[np.float64], q: float) -> float:
    """The q-th percentile (0..100), NaN for no values."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class EvalSet:
    """Rank requests from an eval.jsonl: bodies without labels, and the labels beside them."""

    requests: list[dict[str, Any]]
    labels: list[npt.NDArray[np.float32] | None]
    path: Path

    @classmethod
    def load(cls, path: Path, limit: int = 0) -> EvalSet:
        reqs, labels = [], []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                lab = r.pop("labels", None)
                r.pop("version", None)  # never pin: the ranker's traffic split decides
                reqs.append(r)
                labels.append(None if lab is None else np.asarray(lab, dtype=np.float32))
                if limit and len(reqs) >= limit:
                    break
        if not reqs:
            raise ValueError(f"{path}: no requests")
        return cls(reqs, labels, Path(path))

    def offline_auc(self) -> float | None:
        """The INT4 AUC the store recorded for this eval set (metrics.json beside it)."""
        m = self.path.parent / "metrics.json"
        try:
            return float(json.loads(m.read_text())["int4_auc"])
        except (OSError, KeyError, ValueError):
            return None


@dataclass
class ServedLog:
    """Every answered request of one Locust process: a CSV row each, and scores per version."""

    out: IO[str] | None = None
    counts: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    _scores: dict[str, list[npt.NDArray[np.float32]]] = field(default_factory=lambda: defaultdict(list))
    _labels: dict[str, list[npt.NDArray[np.float32]]] = field(default_factory=lambda: defaultdict(list))
    _writer: Any = None

    def __post_init__(self) -> None:
        if self.out is not None:
            self._writer = csv.writer(self.out)
            self._writer.writerow(REQUEST_LOG_COLUMNS)

    def record(self, t: float, latency_ms: float, status: int, version: str, kind: str,
               scores: npt.NDArray[np.float32] | None = None,
               labels: npt.NDArray[np.float32] | None = None) -> None:
        """One answered request; `version` empty when it failed before naming one."""
        ok = status == 200 and bool(version)
        if ok:
            self.counts[version] += 1
            if scores is not None and labels is not None and scores.size == labels.size:
                self._scores[version].append(scores)
                self._labels[version].append(labels)
        else:
            self.failures += 1
        if self._writer is not None:
            self._writer.writerow((f"{t:.4f}", f"{latency_ms:.3f}", status, version or "-", kind))

    def served_auc(self) -> dict[str, float]:
        return {v: auc(np.concatenate(self._labels[v]), np.concatenate(self._scores[v]))
                for v in sorted(self._scores)}

    def summary(self) -> dict[str, Any]:
        aucs = self.served_auc()
        total = sum(self.counts.values())
        return {"failures": self.failures,
                "versions": {v: {"requests": n, "share": n / total if total else 0.0,
                                 "candidates": int(sum(s.size for s in self._scores[v])),
                                 "served_auc": None if math.isnan(aucs.get(v, math.nan))
                                 else round(aucs[v], 5)}
                             for v, n in sorted(self.counts.items())}}

    def close(self) -> None:
        if self.out is not None:
            self.out.flush()
            self.out.close()
            self.out = None


@dataclass(frozen=True)
class Request:
    """One row of a request log."""

    t: float
    latency_ms: float
    status: int
    version: str
    kind: str


def read_request_log(path: Path) -> list[Request]:
    with open(path, newline="", encoding="utf-8") as f:
        return [Request(float(r["t"]), float(r["latency_ms"]), int(r["status"]), r["version"],
                        r["kind"]) for r in csv.DictReader(f)]


def shares_by_second(rows: Iterable[Request], bin_s: float = 1.0
                     ) -> tuple[npt.NDArray[np.float64], dict[str, npt.NDArray[np.float64]]]:
    """(bin start times, {version: share of that bin's successful requests})."""
    ok = [r for r in rows if r.status == 200 and r.version != "-"]
    if not ok:
        return np.zeros(0), {}
    t0 = min(r.t for r in ok)
    nbins = int((max(r.t for r in ok) - t0) // bin_s) + 1
    versions = sorted({r.version for r in ok})
    counts = {v: np.zeros(nbins) for v in versions}
    for r in ok:
        counts[r.version][int((r.t - t0) // bin_s)] += 1
    total = sum(counts.values())
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = {v: np.where(total > 0, c / total, np.nan) for v, c in counts.items()}
    starts: npt.NDArray[np.float64] = t0 + np.arange(nbins, dtype=np.float64) * bin_s
    return starts, {v: np.asarray(s, dtype=np.float64) for v, s in shares.items()}

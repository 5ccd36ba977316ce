"""A PNG of a load run during a rollout: latency, throughput, traffic per version, phases.

    python -m loadtest.locust.report --csv build/demo/locust --journal build/demo/journal.sqlite \\
        --out build/demo/report.png

Inputs:
- PREFIX_stats_history.csv, Locust's `--csv PREFIX --csv-full-history` output: the
  "Aggregated" row of every second gives requests/s, failures/s, p50 and p99 (Locust's
  percentiles over its last ~10 s);
- PREFIX_requests.csv (loadtest/locust/locustfile.py): one row per request naming the version
  that answered it, binned per second into each version's traffic share;
- the controller's SQLite journal (deploy_controller/journal.py: `rollouts`, `events`),
  read only: each rollout overlapping the run is drawn as vertical lines at its phase
  boundaries (stage dense, stage embeddings + switch, each canary share, retire, end).
"""

from __future__ import annotations

import argparse
import csv
import math
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from deploy_controller.journal import Rollout, read_rollouts
from deploy_controller.state import Kind, Phase, Step
from loadtest.locust.served import Request, read_request_log, shares_by_second

F64 = npt.NDArray[np.float64]
PHASE_LABEL = {Phase.STAGE_DENSE: "1 stage dense", Phase.STAGE_EMBEDDINGS: "2 stage embeddings",
               Phase.RETIRE: "3 retire", Phase.ROLLBACK: "rollback"}


# ------------------------------------------------------------------ inputs


@dataclass
class History:
    """Locust's aggregated stats, one row per second."""

    t: F64
    users: F64
    rps: F64
    fps: F64
    p50_ms: F64
    p99_ms: F64


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # "N/A" before the first request


def read_history(path: Path) -> History:
    rows: list[tuple[float, ...]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["Name"] != "Aggregated":
                continue
            rows.append((_num(r["Timestamp"]), _num(r["User Count"]), _num(r["Requests/s"]),
                         _num(r["Failures/s"]), _num(r["50%"]), _num(r["99%"])))
    a = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return History(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5])


@dataclass(frozen=True)
class Mark:
    """A vertical line: when, what, and whether it starts a phase (drawn heavier)."""

    t: float
    label: str
    phase: bool


def marks(r: Rollout) -> list[Mark]:
    """Phase starts, canary shares (when each shift took effect) and the end."""
    out: list[Mark] = []
    phase: Phase | None = None
    for e in r.events:
        try:
            step = Step.parse(e.step)
        except ValueError:
            continue
        if e.event == "begin" and step.phase != phase and step.phase in PHASE_LABEL:
            phase = step.phase
            out.append(Mark(e.ts, PHASE_LABEL[phase], True))
        if e.event == "end" and e.outcome == "ok" and step.kind is Kind.SHIFT \
                and step.index < len(r.canary):
            out.append(Mark(e.ts, f"{r.canary[step.index]}% {r.to_version}", False))
    if r.finished_at is not None:
        out.append(Mark(r.finished_at, r.status.replace("_", " "), True))
    return out


# ------------------------------------------------------------------ plot


def render(out: Path, history: History | None, requests: Sequence[Request],
           rollouts: Sequence[Rollout], title: str = "") -> Path:
    """Write the PNG; time axes are seconds since the first request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [r.t for r in requests]
    if history is not None and history.t.size:
        starts.append(float(np.nanmin(history.t)))
    t0 = min(starts) if starts else 0.0
    panels = 3 if requests else 2
    fig, axes = plt.subplots(panels, 1, figsize=(12, 2.6 * panels + 0.6), sharex=True,
                             squeeze=False)
    ax_lat, ax_rps = axes[0][0], axes[1][0]
    if history is not None and history.t.size:
        x = history.t - t0
        ax_lat.plot(x, history.p50_ms, label="p50", color="tab:blue")
        ax_lat.plot(x, history.p99_ms, label="p99", color="tab:red")
        ax_rps.plot(x, history.rps, label="requests/s", color="tab:green")
        if np.nansum(history.fps) > 0:
            ax_rps.plot(x, history.fps, label="failures/s", color="black")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_title("latency (Locust, last ~10 s)", loc="left", fontsize=9)
    ax_rps.set_ylabel("requests/s")
    ax_lat.set_ylim(bottom=0)
    ax_rps.set_ylim(bottom=0)
    if requests:
        ax_share = axes[2][0]
        bins, shares = shares_by_second(requests)
        if shares:
            names = sorted(shares)
            ax_share.stackplot(bins - t0, *(np.nan_to_num(shares[v]) * 100 for v in names),
                               labels=names, step="post", alpha=0.8)
        ax_share.set_ylabel("traffic share (%)")
        ax_share.set_ylim(0, 100)
        ax_share.set_title("version that answered each request (per second)", loc="left",
                           fontsize=9)
    if requests:
        bx, p99 = p99_by_bin(requests, 2.0)
        ax_lat.plot(bx - t0, p99, ".", color="tab:red", alpha=0.35, markersize=4,
                    label="p99 per 2 s (request log)")
        top = np.nanmax(np.concatenate([p99, history.p99_ms if history is not None
                                        else np.zeros(1)]))
        if np.isfinite(top):
            ax_lat.set_ylim(0, top * 1.08)
    span = (max(starts + [r.end for r in rollouts]) - t0) if starts else 1.0
    for r in rollouts:
        for row in axes:
            row[0].axvspan(r.start - t0, r.end - t0, color="0.92", zorder=0)
        stagger, last = 0, -math.inf
        for m in sorted(marks(r), key=lambda m: m.t):
            for row in axes:
                row[0].axvline(m.t - t0, color="dimgray" if m.phase else "darkorange",
                               linestyle="-" if m.phase else "--",
                               linewidth=1.2 if m.phase else 0.9)
            # Marks closer than 2% of the axis get their labels side by side, not on top.
            stagger = stagger + 1 if m.t - last < 0.02 * span else 0
            last = m.t
            ax_lat.annotate(m.label, xy=(m.t - t0, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2 + 9 * stagger, -2), textcoords="offset points",
                            rotation=90, va="top", ha="left", fontsize=7,
                            color="black" if m.phase else "darkorange")
    for row in axes:
        if row[0].get_legend_handles_labels()[0]:
            row[0].legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
                          frameon=False)
    axes[-1][0].set_xlabel("seconds since the first request")
    fig.suptitle(title or "load during rollout", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def p99_by_bin(requests: Sequence[Request], bin_s: float) -> tuple[F64, F64]:
    """(bin start, p99 of the successful requests started in it) from a request log."""
    ok = sorted((r.t, r.latency_ms) for r in requests if r.status == 200)
    if not ok:
        return np.zeros(0), np.zeros(0)
    t = np.array([x[0] for x in ok])
    lat = np.array([x[1] for x in ok])
    idx = ((t - t[0]) // bin_s).astype(np.int64)
    bins = np.unique(idx)
    p99 = np.array([np.percentile(lat[idx == b], 99) for b in bins], dtype=np.float64)
    return t[0] + bins.astype(np.float64) * bin_s, p99


def overlapping(rollouts: Sequence[Rollout], t0: float, t1: float) -> list[Rollout]:
    return [r for r in rollouts if r.end >= t0 and r.start <= t1]


def build(prefix: str, journal: Path | None, out: Path, title: str = "") -> Path:
    """Read the run's files, pick the rollouts that overlap it, write the PNG."""
    hist_path = Path(f"{prefix}_stats_history.csv")
    history = read_history(hist_path) if hist_path.is_file() else None
    req_path = Path(f"{prefix}_requests.csv")
    requests = read_request_log(req_path) if req_path.is_file() else []
    if history is None and not requests:
        raise FileNotFoundError(f"neither {hist_path} nor {req_path} exists")
    times = [r.t for r in requests]
    if history is not None and history.t.size:
        times += [float(np.nanmin(history.t)), float(np.nanmax(history.t))]
    rollouts = read_rollouts(journal) if journal is not None else []
    return render(out, history, requests, overlapping(rollouts, min(times), max(times)), title)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.locust.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True, metavar="PREFIX", help="Locust's --csv prefix")
    p.add_argument("--journal", type=Path, help="the controller's SQLite journal")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    try:
        path = build(args.csv, args.journal, args.out, args.title)
    except (OSError, sqlite3.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

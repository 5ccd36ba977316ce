"""The freshness scenario's PNG: served AUC over time with its phases, seq over time, lag per delta.

Matplotlib on the Agg backend, imported lazily (as loadtest/bench/plotting.py does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from loadtest.stack.fresh_timeline import Answer, Phase, Window, seq_series

PHASE_COLOURS = ("#dde7f3", "#e3f1de", "#f6e6d5", "#eee")


def plot(path: Path, title: str, t0: float, phases: Sequence[Phase], wins: Sequence[Window],
         answers: Sequence[Answer], rankers: int, delta_version: str,
         written: Mapping[int, float], lags: Mapping[int, float | None],
         anchors: Mapping[str, float]) -> Path:
    """Write the PNG; `anchors` are offline AUCs drawn as horizontal lines (name -> AUC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_gain, ax_seq, ax_lag) = plt.subplots(
        4, 1, figsize=(11, 12.5), gridspec_kw={"height_ratios": [3, 1.6, 2, 1.4]})
    for ax in (ax_auc, ax_gain, ax_seq):
        for k, p in enumerate(phases):
            ax.axvspan(p.start - t0, p.end - t0, color=PHASE_COLOURS[k % len(PHASE_COLOURS)],
                       zorder=0)
    for p in phases:
        ax_auc.text((p.start + p.end) / 2 - t0, 1.0, p.name, transform=ax_auc.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)
    mid = np.array([(w.start + w.end) / 2 - t0 for w in wins])
    ax_auc.plot(mid, [w.served_auc for w in wins], "o-", color="C0", ms=3,
                label="served AUC (answers' scores vs labels)")
    ax_auc.plot(mid, [w.baseline_auc for w in wins], "x--", color="C7", ms=3, lw=1,
                label="same requests, had static v1 served them (offline)")
    for k, (name, a) in enumerate(anchors.items()):
        ax_auc.axhline(a, ls=":", lw=1, color=f"C{k + 1}", label=f"{name} (offline, whole eval set): {a:.4f}")
    ax_auc.set_ylabel("AUC per window")
    ax_auc.legend(fontsize=7, loc="lower right")
    ax_auc.grid(alpha=0.3)

    gain = [w.served_auc - w.baseline_auc for w in wins]
    ax_gain.bar(mid, gain, width=0.8 * (wins[0].end - wins[0].start) if wins else 1.0,
                color=["C2" if g >= 0 else "C3" for g in gain])
    ax_gain.axhline(0, color="k", lw=0.8)
    ax_gain.set_ylabel("served - static v1\n(same requests)")
    ax_gain.grid(alpha=0.3)
    ax_gain.set_xlim(ax_auc.get_xlim())

    for r in range(rankers):
        ts, seqs = seq_series([a for a in answers if a.ranker == r], delta_version)
        ax_seq.plot(ts - t0, seqs, ".", ms=2, label=f"ranker {r}: seq of its {delta_version} answers")
    if written:
        ws = sorted(written.items())
        ax_seq.plot([t - t0 for _, t in ws], [s for s, _ in ws], "k|", ms=8,
                    label="delta written (its written_at)")
    ax_seq.set_ylabel("delta seq")
    ax_seq.set_xlabel("seconds since the load started")
    ax_seq.legend(fontsize=7, loc="upper left")
    ax_seq.grid(alpha=0.3)
    ax_seq.set_xlim(ax_auc.get_xlim())

    seqs_l = sorted(lags)
    vals = [lags[s] if lags[s] is not None else np.nan for s in seqs_l]
    ax_lag.bar([str(s) for s in seqs_l], vals, color="C2")
    ax_lag.set_ylabel("lag (s)")
    ax_lag.set_xlabel("delta seq: written -> every ranker serving it")
    ax_lag.grid(axis="y", alpha=0.3)

    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

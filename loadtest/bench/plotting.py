"""Small PNG plot helper shared by the benchmarks: grouped bars in one or more panels.

    save_panels(path, "P1: gRPC vs in-process", [
        Panel("rows/s", ["512", "4096"], {"in-process": [9e6, 2e7], "gRPC": [1e6, 8e6]},
              ylabel="rows/s", log=True),
        Panel("ratio", ["512", "4096"], {"gRPC / in-process": [0.1, 0.4]}, targets={"0.7x": 0.7}),
    ])

Matplotlib runs on the Agg backend (no display needed) and is imported lazily, so a
benchmark that only writes JSON does not pay for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Panel:
    """One subplot: for each x label, one bar per series (NaN or None = no bar)."""

    title: str
    labels: Sequence[str]
    series: Mapping[str, Sequence[float | None]]
    ylabel: str = ""
    log: bool = False
    """Logarithmic y axis (for rates spanning decades)."""
    targets: Mapping[str, float] = field(default_factory=dict)
    """Horizontal dashed lines, name -> y value (e.g. a target ratio)."""
    annotate: bool = True
    """Write each bar's value above it (3 significant digits)."""


def _fmt(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def save_panels(path: Path | str, title: str, panels: Sequence[Panel], *, note: str = "",
                columns: int = 2) -> Path:
    """Draw `panels` in a grid (`columns` wide) and write a PNG to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, panels, strict=False):
        n = max(len(p.series), 1)
        width = 0.8 / n
        for i, (name, values) in enumerate(p.series.items()):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(p.labels))]
            ys = [float("nan") if v is None else float(v) for v in values]
            bars = ax.bar(xs, ys, width, label=name)
            if p.annotate:
                for b, y in zip(bars, ys, strict=True):
                    if y == y:  # not NaN
                        ax.annotate(_fmt(y), (b.get_x() + b.get_width() / 2, y), ha="center",
                                    va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        for k, (name, y) in enumerate(p.targets.items()):
            ax.axhline(y, linestyle="--", linewidth=1, color=f"C{(k + 3) % 10}", label=name)
        ax.set_xticks(range(len(p.labels)), list(p.labels))
        ax.set_title(p.title, fontsize=10)
        ax.set_ylabel(p.ylabel)
        if p.log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 0.96))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

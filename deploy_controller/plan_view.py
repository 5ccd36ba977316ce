"""`deployctl rollout --plan` and `status`: a rollout's plan as lines for a terminal."""

from __future__ import annotations

from typing import Any


def _share(split: dict[str, float]) -> str:
    return " ".join(f"{v}={s * 100:g}%" for v, s in sorted(split.items()))


def render_plan(p: dict[str, Any]) -> list[str]:
    """Strategy and why, the verdict, then one line per step: traffic, per-version load
    factor, and what each replica holds after it (a column per replica)."""
    lines = [f"{p['model']} {p['from_version']} -> {p['to_version']}: {p['strategy']} "
             f"({p['why']})"]
    if p["strategy"] == "blue_green":
        lines.append(f"capacity rule: load factor <= {p['max_load']:g} "
                     f"(share x replicas / replicas holding the version): {p['verdict']}")
    addrs = [a for reps in p["shards"] for a in reps]
    width = max([len(a) for a in addrs] + [6])
    lines.append(f"  {'step':<20} {'traffic':<18} {'load':<18} "
                 + " ".join(f"{a:<{width}}" for a in addrs))
    for row in p["rows"]:
        load = " ".join(f"{v}={'-' if f is None else f'{f:g}'}x" for v, f in
                        sorted(row["load"].items()) if f != 0)
        held = " ".join(f"{','.join(row['holds'].get(a, [])) or '-':<{width}}" for a in addrs)
        lines.append(f"  {row['step']:<20} {_share(row['split']):<18} {load:<18} {held}")
    return lines

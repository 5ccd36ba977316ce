"""P1's figures (loadtest/bench/embedding.py): the PNG's panels and the printed summary."""

from __future__ import annotations

from typing import Any

from loadtest.bench.lookup_harness import MODES
from loadtest.bench.plotting import Panel

_LABELS = {"grpc": "unary", "stream": "stream"}


def p1_panels(result: dict[str, Any]) -> list[Panel]:
    panels = []
    for mode in MODES:
        cells = [c for c in result["cells"] if c["mode"] == mode]
        labels = [str(c["batch"]) for c in cells]
        series: dict[str, list[Any]] = {
            "in-process kernel": [c["in_process"]["rows_per_cpu_s"] for c in cells],
            "in-process servicer (no gRPC)": [c.get("handler", {}).get("rows_per_cpu_s") for c in cells]}
        for tr, label in _LABELS.items():
            for k in (1, 2):
                series[f"gRPC {label}, {k} caller(s)"] = [c[f"{tr}_{k}"]["rows_per_cpu_s"] for c in cells]
        panels.append(Panel(f"{mode}: rows per CPU-second of the serving core", labels, series,
                            ylabel="rows / CPU-s", log=True))
        ratios: dict[str, list[Any]] = {}
        for tr, label in _LABELS.items():
            ratios[f"{label}: per server core"] = [c[tr]["ratio_cpu_best"] for c in cells]
            ratios[f"{label}: if only the bare-gRPC floor"] = [c[tr].get("ratio_cpu_if_only_floor")
                                                               for c in cells]
        panels.append(Panel(f"{mode}: server CPU, gRPC / in-process kernel", labels, ratios,
                            ylabel="ratio", targets={"target 4096: 0.25": 0.25, "target 16384: 0.5": 0.5}))
    return panels


def print_summary(result: dict[str, Any], host: dict[str, Any]) -> None:
    print(f"{'cell':>13} {'kernel us':>9} {'transport':>9} {'server us':>9} {'floor us':>8} "
          f"{'cpu ratio':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for c in result["cells"]:
        for tr, label in _LABELS.items():
            g = c[f"{tr}_1"]
            print(f"{c['mode'] + '-' + str(c['batch']):>13} {c['in_process']['cpu_us_per_call']:>9.1f} "
                  f"{label:>9} {c[tr]['server_cpu_us_per_call']:>9.1f} "
                  f"{c[tr].get('floor_cpu_us_per_call') or float('nan'):>8.1f} "
                  f"{c[tr]['ratio_cpu_best']:>9.3f} {g['p50_us'] / 1e3:>7.2f} {g['p99_us'] / 1e3:>7.2f}")
    for t in result["targets"]:
        print(f"  {t['name']}: {t['value']} vs {t['target']} -> {t.get('text')}")
    for size, v in result.get("grpc_floor", {}).items():
        if isinstance(v, dict):
            print(f"  bare gRPC call, {size}: " + ", ".join(
                f"{k}: p50 {x['p50_us']:.0f} us, server {x['server_cpu_us_per_call']} us CPU/call"
                for k, x in v.items()))
    for c in result.get("workers", {}).get("cells", []):
        print(f"  {c['mode']}-{c['batch']}: " + ", ".join(
            f"{k} {v['rows_per_s']:.3g} rows/s ({v.get('rows_per_cpu_s', 0):.3g}/server CPU-s)"
            for k, v in c.items() if k.startswith("workers_")))
    for name, prof in result.get("profile", {}).items():
        for kind, sm in prof.items():
            cats = sm.get("categories", {})
            print(f"  profile {name} {kind}: " + ", ".join(f"{k} {v}" for k, v in list(cats.items())[:6]))
    print(f"loadavg start {host['loadavg_start']} end {host['loadavg_end']}")

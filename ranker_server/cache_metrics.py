"""The row cache's counters on /metrics, read from RowCache.stats() at scrape time.

One source of truth (the cache's own counters, also shown by GET /admin/v1/cache), so
nothing is counted twice; a retired version's series disappear with its entries. Base
units: rows, bytes, lookups. Hit ratio: rate(ranker_cache_rows_total{result="hit"}) over
the sum of both results, per `rows` kind (requested: repeats within a batch included;
unique: each row once per table per batch, what the wire would carry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_COUNTERS = {  # stats key -> (metric name without _total, help)
    "wire_saved_bytes": ("ranker_cache_wire_saved_bytes",
                         "Answer bytes and 8-byte row ids the cache kept off the wire."),
    "lookups_skipped": ("ranker_cache_lookups_skipped",
                        "Batches whose rows all hit the cache: no embedding lookup at all."),
    "evictions": ("ranker_cache_evictions", "Entries evicted to make room for others."),
    "invalidations": ("ranker_cache_invalidations",
                      "Entries freed because a delta the ranker learned touched their row."),
    "bypassed_rows": ("ranker_cache_bypassed_rows",
                      "Unique rows read through the cache without it (seq not learned yet, "
                      "or a row width the cache does not hold)."),
}


class CacheCollector(Collector):
    """Prometheus collector over a function answering RowCache.stats()."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        rows = CounterMetricFamily("ranker_cache_rows", "Rows looked up through the cache, by "
                                   "kind (requested, unique) and result (hit, miss).",
                                   labels=["version", "rows", "result"])
        counters = {k: CounterMetricFamily(name, doc, labels=["version"])
                    for k, (name, doc) in _COUNTERS.items()}
        entries = GaugeMetricFamily("ranker_cache_entries", "Rows held in the cache.",
                                    labels=["version"])
        held = GaugeMetricFamily("ranker_cache_bytes", "Bytes of rows held in the cache.",
                                 labels=["version"])
        for v in st["versions"]:
            name = v["version"]
            for kind in ("requested", "unique"):
                for result, key in (("hit", "hits"), ("miss", "misses")):
                    rows.add_metric([name, kind, result], v[f"{kind}_{key}"])
            for k, fam in counters.items():
                fam.add_metric([name], v[k])
            entries.add_metric([name], v["entries"])
            held.add_metric([name], v["bytes"])
        yield rows
        yield from counters.values()
        yield entries
        yield held
        yield GaugeMetricFamily("ranker_cache_capacity_bytes", "The cache's size (--cache-bytes).",
                                value=st["capacity_bytes"])

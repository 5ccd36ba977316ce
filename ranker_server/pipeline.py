"""One device batch, start to finish (docs/architecture.md, "one ranking request").

hash IDs to rows (modelpack.plan_rows over the merged batch) -> fire ONE lookup for the
batch (the client sends one Lookup per shard carrying every table) -> while it is in
flight, build the dense inputs and stage them on the device -> await the answers (the
source has checked version and fingerprint) -> stage every feature's rows as one set of
bags (modelpack.torch_ops.plan_bags: row counts checked on the host, three copies) ->
dequantize and pool on the device with the offline scorer's own functions -> dense
forward -> scores (the batch's one device -> host synchronization).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from modelpack.lookup import TableQuery
from modelpack.requests import DecodedRequest, FeatureRows, SparseColumn, plan_rows
from modelpack.schema import FeatureSchema
from modelpack.torch_ops import plan_bags, pool_bags
from ranker_server.device import Device
from ranker_server.sources import Answer, TableSource
from ranker_server.versions import LoadedVersion

T = TypeVar("T")


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class PipelineMetrics(Protocol):
    """What the pipeline records (ranker_server.metrics.Metrics has it; so can a benchmark)."""

    @property
    def lookup_duration(self) -> Observer: ...

    @property
    def forward_duration(self) -> Observer: ...

    @property
    def batch_candidates(self) -> Observer: ...


@dataclass
class LookupPlan:
    """The batch's rows: one query per table, and where each feature's rows sit in it."""

    features: list[FeatureRows]  # schema.sparse order; offsets over the batch's entities
    queries: list[TableQuery]
    segments: list[tuple[int, int, int]]  # per feature: (query index, first row, end row)


@dataclass
class Staged:
    """Dense inputs of a batch, on the device."""

    dense: torch.Tensor  # (N, num_dense) float32
    user_of: torch.Tensor  # (N,) int64: which request (= which user) each candidate has


@dataclass
class StagedRows:
    """Every feature's looked-up rows of a batch, on the device, as one set of bags."""

    rows: torch.Tensor  # (R, row_bytes) uint8, packed INT4
    offsets: torch.Tensor  # (B + 1,) int64
    scale: torch.Tensor  # (B,) float32
    spans: tuple[tuple[int, int], ...]  # per feature, schema.sparse order: its bags


def merge_requests(schema: FeatureSchema, requests: Sequence[DecodedRequest]) -> DecodedRequest:
    """Concatenate requests' features into one: user features get one entity per request."""
    if len(requests) == 1:
        return requests[0]
    sparse = {f.name: SparseColumn(np.concatenate([r.sparse[f.name].ids for r in requests]),
                                   np.concatenate([r.sparse[f.name].lengths for r in requests]))
              for f in schema.sparse}
    return DecodedRequest(num_candidates=sum(r.num_candidates for r in requests), sparse=sparse,
                          dense=np.concatenate([r.dense for r in requests]))


def plan_lookups(version: LoadedVersion, merged: DecodedRequest) -> LookupPlan:
    """Hash every ID to its row and group the rows by table: one query per table."""
    features = plan_rows(version.schema, version.tables, merged)
    by_table: dict[str, list[int]] = {}
    for i, fr in enumerate(features):
        by_table.setdefault(fr.table, []).append(i)
    queries: list[TableQuery] = []
    segments: list[tuple[int, int, int]] = [(0, 0, 0)] * len(features)
    for q, (table, idx) in enumerate(by_table.items()):
        start = 0
        for i in idx:
            n = features[i].rows.size
            segments[i] = (q, start, start + n)
            start += n
        rows = np.concatenate([features[i].rows for i in idx]) if len(idx) > 1 \
            else features[idx[0]].rows
        spec = version.tables[table]
        # Packed INT4 rows cross the wire (4x smaller than fp16): dequantized on our device.
        queries.append(TableQuery(table=table, num_rows=spec.rows, dim=spec.dim, rows=rows,
                                  pooling="none", output="int4"))
    return LookupPlan(features, queries, segments)


def stage_inputs(device: Device, requests: Sequence[DecodedRequest], merged: DecodedRequest
                 ) -> Staged:
    """Build the dense tensor and the candidate -> user index, and copy both to the device."""
    counts = np.array([r.num_candidates for r in requests], dtype=np.int64)
    user_of = np.repeat(np.arange(len(requests), dtype=np.int64), counts)
    return Staged(device.to_device(np.ascontiguousarray(merged.dense, dtype=np.float32)),
                  device.to_device(user_of))


def stage_rows(device: Device, version: LoadedVersion, plan: LookupPlan,
               packed: Sequence[Answer]) -> StagedRows:
    """Check each answer's shape against its query, lay the features' rows out as one set of
    bags and copy it to the device (a short answer is refused here, never gathered past).
    Answers already on the device (the row cache's, on CUDA) are laid out there."""
    if len(packed) != len(plan.queries):
        raise ValueError(f"{len(packed)} answers for {len(plan.queries)} table queries")
    for q, p in zip(plan.queries, packed, strict=True):
        want = (q.rows.size, version.tables[q.table].row_bytes)
        if tuple(p.shape) != want:
            raise ValueError(f"table {q.table}: answer shaped {tuple(p.shape)}, expected {want}")
    poolings = [f.pooling for f in version.schema.sparse]
    offsets = [fr.offsets for fr in plan.features]
    host = [p for p in packed if not isinstance(p, torch.Tensor)]
    if len(host) == len(packed):
        bags = plan_bags(poolings, offsets, [host[q][a:b] for q, a, b in plan.segments])
        rows = device.to_device(bags.rows)
    else:  # the bag plan from the row counts alone, the rows concatenated on the device
        bags = plan_bags(poolings, offsets, [np.empty((b - a, 0), np.uint8)
                                             for _, a, b in plan.segments])
        rows = torch.cat([_on_device(device, packed[q][a:b]) for q, a, b in plan.segments])
    return StagedRows(rows, device.to_device(bags.offsets), device.to_device(bags.scale),
                      bags.spans)


def _on_device(device: Device, rows: Answer) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.to(device.torch_device)
    return device.to_device(rows)


@torch.inference_mode()
def forward(version: LoadedVersion, staged: Staged, rows: StagedRows) -> npt.NDArray[np.float32]:
    """Dequantize, pool, assemble and run the dense model; scores back on the host."""
    pooled = pool_bags(rows.rows, rows.offsets, rows.scale, version.dim)
    # modelpack's assemble_sparse broadcasts ONE user; a batch has one user per request.
    cols = [pooled[a:b].index_select(0, staged.user_of) if f.side == "user" else pooled[a:b]
            for f, (a, b) in zip(version.schema.sparse, rows.spans, strict=True)]
    logits = version.dense(torch.stack(cols, dim=1), staged.dense)
    scores: npt.NDArray[np.float32] = torch.sigmoid(logits).float().cpu().numpy()
    return scores


def warm_up(device: Device, version: LoadedVersion, sizes: Sequence[int]) -> None:
    """Run batches of `sizes` candidates (zero IDs, zero rows) through every device step, so
    the first real requests do not pay for CUDA's lazy initialization (cuBLAS handles,
    kernel loading, the first pinned blocks): ~0.3 s on an H200, past many deadlines."""
    schema = version.schema
    for n in sizes:
        req = DecodedRequest(
            num_candidates=n,
            sparse={f.name: SparseColumn(np.zeros(1 if f.side == "user" else n, np.int64),
                                         np.ones(1 if f.side == "user" else n, np.int64))
                    for f in schema.sparse},
            dense=np.zeros((n, len(schema.dense)), np.float32))
        plan = plan_lookups(version, req)
        packed = [np.zeros((q.rows.size, version.tables[q.table].row_bytes), np.uint8)
                  for q in plan.queries]
        forward(version, stage_inputs(device, [req], req),
                stage_rows(device, version, plan, packed))


def _timed(fn: Callable[..., T], *args: object) -> tuple[T, float]:
    """fn(*args) and its duration, measured on the thread that runs it (not its queueing)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


class Pipeline:
    """Runs batches for any loaded version against one table source on one device."""

    def __init__(self, device: Device, source: TableSource, metrics: PipelineMetrics, *,
                 serial_lookups: bool = False) -> None:
        self.device = device
        self.source = source
        self.metrics = metrics
        self.serial_lookups = serial_lookups

    async def run(self, version: LoadedVersion, requests: Sequence[DecodedRequest],
                  timeout_s: float, *, seq: int | None = None) -> list[npt.NDArray[np.float32]]:
        """Score a batch of requests pinned to `version` at delta `seq` (None: the version's
        current seq); one score array per request."""
        merged = merge_requests(version.schema, requests)
        plan = plan_lookups(version, merged)
        started = time.perf_counter()
        lookup = asyncio.ensure_future(self.source.lookup(version, plan.queries, timeout_s,
                                                          seq=seq))

        def looked_up(task: asyncio.Future[Sequence[Answer]]) -> None:
            self.metrics.lookup_duration.observe(time.perf_counter() - started)
            if not task.cancelled():
                task.exception()  # retrieved here too, in case staging failed first

        lookup.add_done_callback(looked_up)
        try:
            if self.serial_lookups:  # debug: no overlap, to measure what the overlap buys
                await asyncio.wait([lookup])
            # The staging thread works while the event loop sends the lookups out.
            staged = await self.device.stage(stage_inputs, self.device, requests, merged)
            packed = await lookup
        finally:
            if not lookup.done():
                lookup.cancel()
        rows = await self.device.stage(stage_rows, self.device, version, plan, packed)
        scores, took = await self.device.compute(_timed, self.device.guard, forward, version,
                                                 staged, rows)
        self.metrics.forward_duration.observe(took)
        self.metrics.batch_candidates.observe(merged.num_candidates)
        bounds = np.cumsum([0] + [r.num_candidates for r in requests])
        return [scores[a:b] for a, b in itertools.pairwise(bounds)]

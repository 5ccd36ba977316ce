"""Demo training: embedding tables plus a DCN-v2 on a synthetic click log, INT4-aware.

The model is what the serving stack runs: each sparse feature hashes its raw IDs to rows of
its (shared) table with its own seed and pools them per bag; the dense model sees (B, F, D)
pooled embeddings plus (B, Fd) normalized dense features. The second half of training runs
through INT4 row-wise fake quantization (straight-through), so the INT4 tables that ship
score as well as FP32. One epoch is the default on purpose: like real CTR models (Zhang et
al. 2022, "the one-epoch phenomenon") this one overfits in a second pass over the same log
(held-out AUC 0.828 after one epoch, 0.815 after two), so the demo buys quality with data.
`python -m modelpack.train` runs the demo experiment and prints its numbers as JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from modelpack import int4 as int4_codec
from modelpack import synth
from modelpack.dense import build_dense
from modelpack.hashing import rows_for
from modelpack.requests import decode_request
from modelpack.schema import FeatureSchema, TableSpec, validate_schema
from modelpack.synth import ClickLog

ARCHITECTURE = "dcn_v2"
DEFAULT_DENSE: dict[str, object] = {"cross_layers": 2, "cross_rank": 16, "mlp_dims": [256, 128]}


@dataclass(frozen=True)
class TrainedModel:
    """What export needs: FP32 tables (rows, dim) by name and the dense model with its config."""

    tables: dict[str, np.ndarray]
    dense: nn.Module
    architecture: str
    config: dict[str, object]


@dataclass(frozen=True)
class _Features:
    """A log as table rows. Sparse bags are per request (user side) or per example."""

    bags: list[tuple[np.ndarray, np.ndarray]]  # schema.sparse order: (rows, offsets)
    dense: np.ndarray  # (E, Fd) float32, normalized, user side already broadcast
    ex_offsets: np.ndarray  # (R+1,) request r owns examples [ex_offsets[r], ex_offsets[r+1])
    labels: np.ndarray  # (E,) float32


@dataclass(frozen=True)
class _Batch:  # one step's tensors; bags as in _Features, user ones per batch-local request
    bags: list[tuple[Tensor, Tensor]]
    local_req: Tensor  # (B,) batch-local request of each example, to broadcast user bags
    dense: Tensor
    labels: Tensor


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; tied scores share their mean rank."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tie group
    return float((mean_rank[inverse][y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def fake_quant_int4(w: Tensor) -> Tensor:
    """Row-wise INT4 round trip as modelpack.int4 stores it (fp16 scale and bias), in torch."""
    with torch.no_grad():
        bias = w.amin(dim=1, keepdim=True).half().float()
        scale = ((w.amax(dim=1, keepdim=True) - bias) / 15.0).half().float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round((w - bias) / scale).clamp(0, 15) * scale + bias
    return w + (q - w).detach()  # straight-through: forward sees INT4, gradient is identity


def int4_tables(tables: Mapping[str, np.ndarray], block: int = 65536) -> dict[str, np.ndarray]:
    """FP32 tables after the real INT4 codec's round trip (quantize + dequantize)."""
    def round_trip(name: str, w: np.ndarray) -> np.ndarray:
        packed = int4_codec.quantize_rows(np.ascontiguousarray(w, dtype=np.float32), name=name)
        return int4_codec.dequantize_rows(packed, w.shape[1])

    return {name: np.concatenate([round_trip(name, w[i:i + block])
                                  for i in range(0, len(w), block)]) for name, w in tables.items()}


def _ragged_take(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Bags `idx` of a ragged array, concatenated, with their new offsets."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    new = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    pos = np.arange(new[-1], dtype=np.int64) + np.repeat(starts - new[:-1], lengths)
    return values[pos], new


def click_features(schema: FeatureSchema, table_rows: Mapping[str, int], log: ClickLog) -> _Features:
    r, c = log.num_requests, log.candidates_per_request
    bags = []
    for f in schema.sparse:
        values, offsets = log.ids(f.name)
        lengths = np.diff(offsets)
        if f.multi_valued and np.any(lengths > f.max_length):
            # Keep each bag's first max_length IDs, as modelpack.requests (the ranker) does.
            pos = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
            values = values[pos < f.max_length]
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(np.minimum(lengths, f.max_length), out=offsets[1:])
        bags.append((rows_for(values, f.hash_seed, table_rows[f.table]), offsets))
    cols = []
    for d in schema.dense:
        x = d.normalize_array(log.dense(d.name))  # the ranker's own normalization
        cols.append(np.repeat(x, c) if d.side == "user" else x)
    dense = np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((r * c, 0), np.float32)
    return _Features(bags, dense, np.arange(r + 1, dtype=np.int64) * c,
                     log.labels.astype(np.float32))


def make_batch(schema: FeatureSchema, feats: _Features, reqs: np.ndarray) -> _Batch:
    ex, ex_off = _ragged_take(np.arange(len(feats.labels)), feats.ex_offsets, reqs)
    local = np.repeat(np.arange(len(reqs)), np.diff(ex_off))
    bags = []
    for f, (rows, offsets) in zip(schema.sparse, feats.bags, strict=True):
        r, o = _ragged_take(rows, offsets, reqs if f.side == "user" else ex)
        bags.append((torch.from_numpy(r), torch.from_numpy(o)))
    return _Batch(bags, torch.from_numpy(local), torch.from_numpy(feats.dense[ex]),
                  torch.from_numpy(feats.labels[ex]))


def batch_logits(schema: FeatureSchema, weights: Mapping[str, Tensor], dense: nn.Module,
            b: _Batch, quantize: bool) -> Tensor:
    pooled = []
    for f, (rows, offsets) in zip(schema.sparse, b.bags, strict=True):
        w = weights[f.table]
        if quantize:  # quantize only the gathered rows: row-wise INT4 is per row anyway
            vecs = fake_quant_int4(F.embedding(rows, w, sparse=True))
            p = F.embedding_bag(torch.arange(len(rows)), vecs, offsets, mode="sum",
                                include_last_offset=True)
        else:
            p = F.embedding_bag(rows, w, offsets, mode="sum", include_last_offset=True,
                                sparse=True)
        if f.pooling == "mean":  # mean over present IDs; an empty bag stays zero
            p = p / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1).to(p.dtype)
        pooled.append(p[b.local_req] if f.side == "user" else p)
    return cast(Tensor, dense(torch.stack(pooled, dim=1), b.dense))


def train_model(
    schema: FeatureSchema, tables: Sequence[TableSpec], log: ClickLog, *,
    epochs: int = 1, qat_from: float = 0.5, seed: int = 0, batch_size: int = 1024,
    lr: float = 2e-3, embedding_lr: float = 1e-2, init_std: float = 0.05,
    dense_config: Mapping[str, object] | None = None,
    init_from: TrainedModel | None = None, progress: bool = True, threads: int | None = 1,
) -> TrainedModel:
    """Train tables + DCN-v2 on `log`; steps from `qat_from` (a fraction of all) on see INT4.

    `dense_config` overrides DEFAULT_DENSE (cross_layers, cross_rank, mlp_dims);
    `init_from` warm-starts every weight from an earlier model of the same shapes. `threads`:
    torch threads while training (None: as is); 1 is robust, 2 ran up to 30x slower on a busy box.
    """
    validate_schema(schema, list(tables))  # names the first inconsistency before any work
    dim = next(t.dim for t in tables if t.name == schema.sparse[0].table)
    config: dict[str, object] = {**DEFAULT_DENSE, **(dense_config or {}), "embedding_dim": dim,
                                 "num_sparse": len(schema.sparse), "num_dense": len(schema.dense)}
    if init_from is not None:
        want = {t.name: (t.rows, t.dim) for t in tables}
        have = {n: w.shape for n, w in init_from.tables.items()}
        if (init_from.architecture, init_from.config, have) != (ARCHITECTURE, config, want):
            raise ValueError(f"init_from is {init_from.architecture} {init_from.config}, tables "
                             f"{have}; this run needs {ARCHITECTURE} {config}, tables {want}")
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        dense = build_dense(ARCHITECTURE, config)
        bags = {t.name: nn.EmbeddingBag(t.rows, t.dim, mode="sum", sparse=True) for t in tables}
        for bag in bags.values():  # small rows: a tame start for Adam and for INT4's range
            nn.init.normal_(bag.weight, std=init_std)
    if init_from is not None:  # warm start: every weight from the earlier model
        dense.load_state_dict(init_from.dense.state_dict())
        for name, bag in bags.items():
            bag.weight.data.copy_(torch.from_numpy(init_from.tables[name]))
    feats = click_features(schema, {t.name: t.rows for t in tables}, log)
    weights: dict[str, Tensor] = {name: bag.weight for name, bag in bags.items()}
    opt_sparse = torch.optim.SparseAdam(list(weights.values()), lr=embedding_lr)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    per_batch = max(1, batch_size // max(1, log.candidates_per_request))
    steps = -(-log.num_requests // per_batch)  # per epoch
    qat_step = math.ceil(qat_from * epochs * steps)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for epoch in range(epochs):
            order = rng.permutation(log.num_requests)
            bar = tqdm(range(0, len(order), per_batch), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not progress, leave=False)
            for k, i in enumerate(bar):
                b = make_batch(schema, feats, order[i:i + per_batch])
                quantize = epoch * steps + k >= qat_step
                loss = F.binary_cross_entropy_with_logits(
                    batch_logits(schema, weights, dense, b, quantize), b.labels)
                opt_sparse.zero_grad()
                opt_dense.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt_sparse.step()  # type: ignore[no-untyped-call]
                opt_dense.step()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    finally:
        torch.set_num_threads(before)
    return TrainedModel({n: w.detach().numpy().copy() for n, w in weights.items()},
                        dense.eval(), ARCHITECTURE, config)


@torch.inference_mode()
def score_log(trained: TrainedModel, schema: FeatureSchema, log: ClickLog, *,
              int4: bool = False, chunk: int = 4096) -> np.ndarray:
    """Click probabilities (E,) of every example of `log`, FP32 tables or INT4 round-tripped."""
    tables = int4_tables(trained.tables) if int4 else trained.tables
    weights = {n: torch.from_numpy(w) for n, w in tables.items()}
    feats = click_features(schema, {n: w.shape[0] for n, w in tables.items()}, log)
    out = []
    for i in range(0, log.num_requests, chunk):
        b = make_batch(schema, feats, np.arange(i, min(i + chunk, log.num_requests)))
        out.append(torch.sigmoid(batch_logits(schema, weights, trained.dense, b, quantize=False)))
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


@torch.inference_mode()
def score_float(trained: TrainedModel, schema: FeatureSchema,
                requests: Sequence[Mapping[str, Any]], chunk: int = 256) -> np.ndarray:
    """FP32 click probabilities of request dicts (decoded as the ranker does), concatenated."""
    weights = {n: torch.from_numpy(w) for n, w in trained.tables.items()}
    decoded = [decode_request(schema, dict(r), max_candidates=1 << 20) for r in requests]
    out = []
    for start in range(0, len(decoded), chunk):  # many requests per forward: one big batch
        part = decoded[start:start + chunk]
        bags = []
        for f in schema.sparse:
            cols = [d.sparse[f.name] for d in part]
            lengths = np.concatenate([c.lengths for c in cols])
            offsets = np.zeros(lengths.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = np.concatenate([c.ids for c in cols])
            rows = rows_for(ids, f.hash_seed, trained.tables[f.table].shape[0])
            bags.append((torch.from_numpy(rows), torch.from_numpy(offsets)))
        local = np.repeat(np.arange(len(part)), [d.num_candidates for d in part])
        b = _Batch(bags, torch.from_numpy(local),
                   torch.from_numpy(np.concatenate([d.dense for d in part])), torch.zeros(0))
        out.append(torch.sigmoid(batch_logits(schema, weights, trained.dense, b, quantize=False)))
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)


def demo_experiment(*, requests: int = synth.DEMO_REQUESTS, rows: int = synth.DEMO_ROWS,
                    candidates: int = synth.DEMO_CANDIDATES, progress: bool = True
                    ) -> dict[str, float]:
    """Train v1 on day 0, v2 on day 1 (warm-started and fresh) and measure their AUCs;
    "mismatch" is v2's dense model fed v1's tables, what a silent version mix-up serves."""
    schema, tables = synth.demo_schema(rows)
    day0, day1 = (synth.generate_log(requests, candidates, d, 1 + 2 * d) for d in (0, 1))
    eval0, eval1 = (synth.generate_log(requests // 4, candidates, d, 2 + 2 * d) for d in (0, 1))
    schema = synth.fit_normalization(schema, day0)

    def a(m: TrainedModel, log: ClickLog, int4: bool = True) -> float:
        return auc(log.labels, score_log(m, schema, log, int4=int4))

    t = time.perf_counter()
    v1 = train_model(schema, tables, day0, seed=1, progress=progress)
    res = {"train_s_v1": time.perf_counter() - t, "examples": day0.num_examples,
           "ctr_day0": float(day0.labels.mean()),
           "oracle_auc_day0": auc(eval0.labels, eval0.click_prob),
           "v1_fp32_auc_day0": a(v1, eval0, False), "v1_int4_auc_day0": a(v1, eval0),
           "oracle_auc_day1": auc(eval1.labels, eval1.click_prob), "v1_auc_day1": a(v1, eval1)}
    for name, init in (("warm", v1), ("fresh", None)):
        t = time.perf_counter()
        v2 = train_model(schema, tables, day1, seed=2, init_from=init, progress=progress)
        mixed = TrainedModel(v1.tables, v2.dense, v2.architecture, v2.config)
        res |= {f"train_s_v2_{name}": time.perf_counter() - t,
                f"v2_{name}_fp32_auc_day1": a(v2, eval1, False),
                f"v2_{name}_int4_auc_day1": a(v2, eval1),
                f"mismatch_{name}_auc_day1": a(mixed, eval1)}
    return {k: round(float(v), 4) for k, v in res.items()}


if __name__ == "__main__":
    print(json.dumps(demo_experiment(), indent=2))

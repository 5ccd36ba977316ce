"""Demo delta trainer: keep training a version's tables on newer traffic, dense frozen.

It starts from what a read at (V, s) serves (V's INT4 rows with its deltas 1..s applied,
dequantized), loads V's dense model and never updates it, and trains only the embedding
rows (SparseAdam through INT4 fake quantization, like the second half of modelpack.train)
on a synthetic day's log. Every `every` examples it writes the rows touched since the
last delta as delta s + 1, so each delta pairs with V's dense weights by construction.
`python -m modelpack delta-train STORE/MODEL/VERSION` runs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modelpack import synth
from modelpack.delta import DeltaManifest
from modelpack.delta_read import fold, overlay_rows, read_chain
from modelpack.delta_train_size import DeltaTrainSize
from modelpack.delta_write import write_delta
from modelpack.dense import load_dense
from modelpack.int4 import dequantize_rows
from modelpack.manifest import Manifest, verify
from modelpack.scorer import TableReader
from modelpack.train import TrainedModel, auc, batch_logits, click_features, make_batch, score_float

log = logging.getLogger(__name__)


def served_tables(vdir: Path, base: Manifest, upto: int | None = None) -> dict[str, np.ndarray]:
    """Float32 tables as a read at (V, upto) serves them: INT4 rows + deltas, dequantized."""
    chain = read_chain(vdir, upto)
    out = {}
    for spec in base.tables:
        packed = np.concatenate([np.asarray(m) for m in TableReader(vdir, spec).maps])
        merged = fold([d.tables[spec.name] for d in chain if spec.name in d.tables])
        packed = overlay_rows(packed, np.arange(spec.rows, dtype=np.int64), [merged])
        out[spec.name] = dequantize_rows(packed, spec.dim)
    return out


def delta_train(version_dir: Path | str, size: DeltaTrainSize | None = None, *,
                progress: bool = False) -> list[DeltaManifest]:
    """Train V's tables further with V's dense frozen; writes and returns the new deltas."""
    size = size if size is not None else DeltaTrainSize()
    vdir = Path(version_dir)
    base = verify(vdir)
    if size.examples < 1 or size.every < 1 or size.batch_size < 1:
        raise ValueError(f"examples, every and batch_size must be >= 1, got {size}")
    dense = load_dense(vdir / base.dense.path, base.dense.architecture, base.dense.config)
    dense.requires_grad_(False)  # frozen: the deltas are trained against these exact weights
    weights: dict[str, Tensor] = {n: torch.from_numpy(w).requires_grad_()
                                  for n, w in served_tables(vdir, base).items()}
    candidates = synth.DEMO_CANDIDATES
    day_log = synth.generate_log(-(-size.examples // candidates), candidates, size.day, size.seed)
    feats = click_features(base.schema, {t.name: t.rows for t in base.tables}, day_log)
    opt = torch.optim.SparseAdam(list(weights.values()), lr=size.embedding_lr)
    per_batch = max(1, size.batch_size // candidates)
    order = np.random.default_rng(size.seed).permutation(day_log.num_requests)
    touched: dict[str, list[np.ndarray]] = {n: [] for n in weights}
    written: list[DeltaManifest] = []
    seen = since = 0
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as modelpack.train: 2 threads ran up to 30x slower on a busy box
    try:
        for i in range(0, len(order), per_batch):
            b = make_batch(base.schema, feats, order[i:i + per_batch])
            loss = F.binary_cross_entropy_with_logits(
                batch_logits(base.schema, weights, dense, b, quantize=True), b.labels)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()  # type: ignore[no-untyped-call]
            for f, (rows, _) in zip(base.schema.sparse, b.bags, strict=True):
                touched[f.table].append(rows.numpy())
            n = int(b.labels.numel())
            seen, since = seen + n, since + n
            if since >= size.every or i + per_batch >= len(order):
                written.append(_emit(vdir, weights, touched, {
                    "trainer": "modelpack.delta_train", "day": size.day, "log_seed": size.seed,
                    "examples": seen, "loss": round(float(loss.item()), 5),
                    "train_seconds": round(time.perf_counter() - t0, 2)}))
                since = 0
                if progress:
                    log.info("delta %d after %d examples", written[-1].seq, seen)
    finally:
        torch.set_num_threads(threads)
    return written


def _emit(vdir: Path, weights: dict[str, Tensor], touched: dict[str, list[np.ndarray]],
          provenance: dict[str, Any]) -> DeltaManifest:
    updates = {}
    for name, parts in touched.items():
        if parts:
            rows = np.unique(np.concatenate(parts))
            updates[name] = (rows, weights[name].detach()[torch.from_numpy(rows)].numpy())
            parts.clear()
    return write_delta(vdir, updates, provenance=provenance)


def served_scores(vdir: Path, base: Manifest, requests: Sequence[dict[str, Any]],
                  upto: int | None) -> np.ndarray:
    """Click probabilities of (V's dense, V's rows + deltas 1..upto) for request bodies, concatenated."""
    dense = load_dense(vdir / base.dense.path, base.dense.architecture, base.dense.config)
    model = TrainedModel(served_tables(vdir, base, upto), dense, base.dense.architecture,
                         dict(base.dense.config))
    bodies = [{k: v for k, v in r.items() if k != "labels"} for r in requests]
    return score_float(model, base.schema, bodies)


def served_auc(vdir: Path, base: Manifest, requests: Sequence[dict[str, Any]],
               upto: int | None) -> float:
    """AUC of (V's dense, V's rows + deltas 1..upto) on labelled requests (eval.jsonl)."""
    labels = np.concatenate([np.asarray(r["labels"], dtype=np.float32) for r in requests])
    return auc(labels, served_scores(vdir, base, requests, upto))

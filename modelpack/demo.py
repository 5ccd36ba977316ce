"""Build the demo model store: `ads_ctr` v1 (day 0) and v2 (day 1), with eval data and AUCs.

Each version directory also holds `eval.jsonl` (held-out ranking requests in the
`/v1/rank` JSON format plus `labels`) and `metrics.json`: FP32 AUC, INT4 AUC (the tables
exactly as shipped: same quantizer, bit for bit) and, for v2, the AUC of v2's dense model
fed v1's embeddings, which is what a silent version mismatch would serve.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelpack.export import export_version
from modelpack.manifest import Manifest
from modelpack.synth import MODEL_NAME, demo_schema, fit_normalization, generate_log
from modelpack.train import TrainedModel, auc, int4_tables, score_float, train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """Knobs of the demo build; tests use tiny values to build a store in seconds."""

    rows: int = 200_000
    requests: int = 125_000
    candidates: int = 16
    eval_requests: int = 4_000
    num_shards: int = 2
    epochs: int = 1  # a second pass over one day's log overfits (held-out AUC drops)


def _labels(reqs: list[dict[str, Any]]) -> np.ndarray:
    return np.concatenate([np.asarray(r["labels"], dtype=np.float32) for r in reqs])


def _jsonl(reqs: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in reqs).encode()


def build_demo_store(store: Path, size: DemoSize = DemoSize(), *, progress: bool = True,
                     overwrite: bool = False) -> list[tuple[Manifest, dict[str, Any]]]:
    """Train and export v1 and v2 of the demo model; returns (manifest, metrics) per version."""
    schema, tables = demo_schema(size.rows, num_shards=size.num_shards)
    days = [generate_log(size.requests, size.candidates, day, seed=10 + day) for day in (0, 1)]
    evals = [generate_log(size.eval_requests, size.candidates, day, seed=20 + day).to_requests(
        0, size.eval_requests) for day in (0, 1)]
    for day, reqs in enumerate(evals):
        for i, r in enumerate(reqs):
            r["request_id"] = f"eval-d{day}-{i:06d}"
    schema = fit_normalization(schema, days[0])
    out: list[tuple[Manifest, dict[str, Any]]] = []
    prev: TrainedModel | None = None
    for day, version in enumerate(("v1", "v2")):
        t0 = time.perf_counter()
        # v2 is trained incrementally from v1 on day 1, as production refreshes are.
        trained = train_model(schema, tables, days[day], seed=1 + day, epochs=size.epochs,
                              init_from=prev, progress=progress)
        train_s = time.perf_counter() - t0
        labels = _labels(evals[day])
        q = TrainedModel(int4_tables(trained.tables), trained.dense, trained.architecture,
                         trained.config)
        metrics: dict[str, Any] = {
            "eval_requests": len(evals[day]), "eval_examples": int(labels.size),
            "eval_ctr": round(float(labels.mean()), 5),
            "train_examples": days[day].num_examples, "train_seconds": round(train_s, 1),
            "fp32_auc": round(auc(labels, score_float(trained, schema, evals[day])), 5),
            "int4_auc": round(auc(labels, score_float(q, schema, evals[day])), 5),
        }
        if prev is not None:
            mixed = TrainedModel(int4_tables(prev.tables), trained.dense, trained.architecture,
                                 trained.config)
            metrics["mismatch_auc"] = round(auc(labels, score_float(mixed, schema, evals[day])), 5)
            metrics["mismatch_note"] = "v2 dense model fed v1 INT4 embeddings on v2's eval set"
        m = export_version(
            store, MODEL_NAME, version, schema=schema, tables=trained.tables,
            num_shards=size.num_shards, dense=trained.dense, architecture=trained.architecture,
            config=trained.config, progress=progress, overwrite=overwrite,
            extra_files={"eval.jsonl": _jsonl(evals[day]),
                         "metrics.json": json.dumps(metrics, indent=2).encode() + b"\n"},
            provenance={"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "parent_version": "v1" if version == "v2" else None,
                        "training_window": f"synthetic day {day}",
                        "generator": "modelpack.synth", "size": size.__dict__},
        )
        out.append((m, metrics))
        prev = trained
    return out


def describe(store: Path, results: list[tuple[Manifest, dict[str, Any]]]) -> str:
    """A human summary of what the demo store holds and how good each version is."""
    lines = [f"model store {store.resolve()}"]
    for m, met in results:
        lines.append(f"  {m.model}/{m.version}  fingerprint {m.fingerprint[:23]}...")
        for t in m.tables:
            size = sum(f.bytes for f in m.files if f.path.startswith(f"tables/{t.name}/"))
            lines.append(f"    table {t.name}: {t.rows:,} rows x {t.dim} dims INT4, "
                         f"{t.num_shards} shards, {size / 1e6:.1f} MB")
        feats = ", ".join(f.name for f in m.schema.sparse)
        lines.append(f"    sparse features: {feats}")
        lines.append(f"    dense: {m.dense.architecture} {m.dense.config}")
        lines.append(f"    eval: {met['eval_requests']} requests / {met['eval_examples']} "
                     f"candidates, CTR {met['eval_ctr']:.3f}")
        lines.append(f"    AUC  fp32 {met['fp32_auc']:.4f}   int4 {met['int4_auc']:.4f}   "
                     f"(int4 - fp32 = {met['int4_auc'] - met['fp32_auc']:+.4f})")
        if "mismatch_auc" in met:
            lines.append(f"    AUC  silent mismatch (v2 dense + v1 tables) {met['mismatch_auc']:.4f}"
                         f"   ({met['mismatch_auc'] - met['int4_auc']:+.4f} vs v2)")
    return "\n".join(lines)


def load_results(store: Path, model: str) -> list[tuple[Manifest, dict[str, Any]]] | None:
    """The demo's versions if both already exist and verify, else None."""
    from modelpack.manifest import verify

    out = []
    for version in ("v1", "v2"):
        vdir = store / model / version
        if not vdir.is_dir():
            return None
        m = verify(vdir)
        out.append((m, json.loads((vdir / "metrics.json").read_text())))
    return out

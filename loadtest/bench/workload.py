"""Ranking requests for the ranker benchmarks: N-candidate requests built from eval.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelpack.manifest import read_manifest
from ranker_server import codec

MODEL = "ads_ctr"


def version_dir(store: Path | str, version: str = "v1") -> Path:
    """A version directory, given either it or a model store holding ads_ctr/<version>."""
    path = Path(store)
    return path if (path / "manifest.json").is_file() else path / MODEL / version


def build_requests(eval_path: Path, num_requests: int, num_candidates: int, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """`num_requests` requests of `num_candidates` each, from a version's eval.jsonl.

    eval.jsonl requests carry 16 candidates; request i keeps eval request i's user and
    takes `num_candidates` candidates from the shuffled pool of every eval candidate.
    """
    evals = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    pool = [c for r in evals for c in r["candidates"]]
    order = np.random.default_rng(seed).permutation(len(pool))
    out = []
    for i in range(num_requests):
        start = (i * num_candidates) % len(pool)
        idx = [int(order[(start + j) % len(pool)]) for j in range(num_candidates)]
        ev = evals[i % len(evals)]
        out.append({"request_id": f"bench-{i:05d}", "model": ev["model"], "user": ev["user"],
                    "candidates": [pool[j] for j in idx]})
    return out


def mixed_requests(eval_path: Path, num_requests: int, max_candidates: int, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """Requests of 1..max_candidates candidates (uniform), users and candidates from eval.jsonl."""
    evals = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    pool = [c for r in evals for c in r["candidates"]]
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_candidates + 1, size=num_requests)
    return [{"request_id": f"mixed-{i:05d}", "model": evals[i % len(evals)]["model"],
             "user": evals[i % len(evals)]["user"],
             "candidates": [pool[int(j)] for j in rng.integers(0, len(pool), size=int(k))]}
            for i, k in enumerate(sizes)]


def encode_bodies(vdir: Path, requests: list[dict[str, Any]], kind: codec.BodyKind) -> list[bytes]:
    """Request bodies as a client sends them: protobuf (the ranker's codec) or JSON."""
    if kind == "json":
        return [json.dumps(r, separators=(",", ":")).encode() for r in requests]
    schema = read_manifest(vdir).schema
    return [codec.encode_request(r, schema) for r in requests]


def protobuf_bodies(vdir: Path, n: int, candidates: int) -> list[bytes]:
    return encode_bodies(vdir, build_requests(vdir / "eval.jsonl", n, candidates), "protobuf")

"""The offline truth of the freshness scenario: what a read at (V, s) scores, without servers.

Scores come from modelpack.delta_train.served_scores: V's dense model over V's INT4 rows
with deltas 1..s applied (modelpack.delta_read's reference semantics), dequantized, on the
CPU. They anchor the served numbers (AUC per seq on the whole eval set) and check every
served answer against the (version, seq) it names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.locust.served import EvalSet, auc
from loadtest.stack.fresh_timeline import Answer, Scores


@dataclass
class EvalData:
    """An eval.jsonl as the scenario uses it: bodies without labels, labels, protobuf bodies."""

    evalset: EvalSet
    bodies: list[bytes]
    sizes: list[int]
    """Candidates per request."""

    @classmethod
    def load(cls, path: Path, limit: int = 0) -> EvalData:
        from modelpack.manifest import read_manifest
        from ranker_server.codec import encode_request

        ev = EvalSet.load(path, limit)
        if any(lab is None for lab in ev.labels):
            raise ValueError(f"{path}: every request needs its labels")
        schema = read_manifest(path.parent).schema
        return cls(ev, [encode_request(r, schema) for r in ev.requests],
                   [len(r["candidates"]) for r in ev.requests])

    @property
    def requests(self) -> list[dict[str, object]]:
        return self.evalset.requests

    @property
    def labels(self) -> list[np.ndarray]:
        return [lab for lab in self.evalset.labels if lab is not None]


def scores_at(vdir: Path, seq: int | None, data: EvalData, indices: Iterable[int]
              ) -> dict[int, Scores]:
    """Offline scores of the eval requests `indices` at (V, seq) (None: every delta present)."""
    from modelpack.delta_train import served_scores
    from modelpack.manifest import read_manifest

    idx = sorted(set(indices))
    if not idx:
        return {}
    flat = served_scores(vdir, read_manifest(vdir), [data.requests[i] for i in idx], seq)
    bounds = np.cumsum([0] + [data.sizes[i] for i in idx])
    return {i: flat[bounds[k]:bounds[k + 1]] for k, i in enumerate(idx)}


def all_scores(vdir: Path, seq: int | None, data: EvalData) -> list[Scores]:
    """Offline scores of every eval request at (V, seq), in eval order."""
    got = scores_at(vdir, seq, data, range(len(data.requests)))
    return [got[i] for i in range(len(data.requests))]


def auc_at(vdir: Path, seq: int | None, data: EvalData) -> float:
    """AUC of (V's dense, V's rows + deltas 1..seq) on the whole eval set."""
    return auc(np.concatenate(data.labels), np.concatenate(all_scores(vdir, seq, data)))


def for_answers(model_dir: Path, answers: Sequence[Answer], data: EvalData,
                known: Sequence[str]) -> dict[tuple[str, int], dict[int, Scores]]:
    """Offline scores for every (version, seq) the answers name, over the requests answered
    at that seq or at the next one (for fresh_timeline.check_answers' neighbour test).

    Versions outside `known` and seqs with no delta on disk get no entry: an answer
    naming them is a mismatch."""
    from modelpack.delta_read import list_seqs

    need: dict[tuple[str, int], set[int]] = defaultdict(set)
    for a in answers:
        if a.ok and a.version in known:
            need[(a.version, a.seq)].add(a.index)
            if a.seq >= 1:
                need[(a.version, a.seq - 1)].add(a.index)
    out: dict[tuple[str, int], dict[int, Scores]] = {}
    for (v, s), idx in sorted(need.items()):
        vdir = model_dir / v
        if s == 0 or s in list_seqs(vdir):
            out[(v, s)] = scores_at(vdir, s, data, idx)
    return out

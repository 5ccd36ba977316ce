"""The knobs of a delta-training run, apart from the trainer so the CLI need not import torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeltaTrainSize:
    """Knobs of one delta-training run."""

    examples: int = 2_000_000
    """training examples to read from the day's log (requests x candidates); 2M is the demo's day"""
    every: int = 100_000
    """write a delta after this many examples (and once at the end)"""
    day: int = 1
    """synthetic day whose traffic to train on (the demo's v2 was trained on day 1)"""
    seed: int = 11
    """seed of the day's log (the demo store drew v2's day-1 training log with seed 11)"""
    batch_size: int = 1024
    """examples per training step"""
    embedding_lr: float = 3e-3
    """SparseAdam learning rate of the embedding rows (demo day 1: 3e-3 beat 1e-2 and 3e-2)"""

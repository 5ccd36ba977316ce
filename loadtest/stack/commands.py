"""The fleet's command lines and fleet file: one place for `make up`, `make demo` and the e2e tests.

Every server listens on 127.0.0.1 only; each builder returns the arguments after
`python -m <module>` (the port flags are ServerProcess's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from loadtest.harness.probes import LOOPBACK

DEFAULT_PORTS = {"shard": 50051, "ranker": 8080, "controller": 8090}
"""The fixed ports of `make up` (shard k replica r counts up from 50051)."""


def desired_state_file(token_file: Path) -> Path:
    """The fleet's desired-state file: beside the token, in the stack's private directory
    (every builder gets the token, so shards, rankers and the controller share one path)."""
    return token_file.parent / "desired-state.json"


def shard_args(store: Path, model: str, version: str, shard: int, num_shards: int,
               token_file: Path, *extra: str) -> list[str]:
    """Arguments of `python -m embedding_server` for one replica of shard `shard`."""
    return ["--store", str(store), "--shard", str(shard), "--num-shards", str(num_shards),
            "--preload", f"{model}/{version}", "--admin-token-file", str(token_file),
            "--desired-state", str(desired_state_file(token_file)), "--host", LOOPBACK, *extra]


def ranker_args(store: Path, model: str, version: str, shards: Sequence[Sequence[str]],
                token_file: Path, *extra: str) -> list[str]:
    """Arguments of `python -m ranker_server`; `shards[k]` = replica addresses of shard k."""
    spec = ",".join("|".join(reps) for reps in shards)
    return ["--store", str(store), "--model", model, "--version", version,
            "--embedding-shards", spec, "--admin-token-file", str(token_file),
            "--desired-state", str(desired_state_file(token_file)), "--host", LOOPBACK, *extra]


def controller_args(store: Path, journal: Path, fleet_file: Path, token_file: Path,
                    *extra: str) -> list[str]:
    """Arguments of `python -m deploy_controller` with local discovery."""
    return ["--journal", str(journal), "--admin-token-file", str(token_file),
            "--discovery", "local", "--fleet", str(fleet_file), "--store", str(store),
            "--desired-state", str(desired_state_file(token_file)), "--host", LOOPBACK, *extra]


def fleet_json(ranker_urls: Sequence[str], shards: Sequence[Sequence[str]]) -> str:
    """The controller's fleet file (deploy_controller/discovery.py)."""
    return json.dumps({"rankers": list(ranker_urls),
                       "embedding_shards": [list(reps) for reps in shards]}, indent=2)

"""Where the fleet is: rankers' base URLs and, per embedding shard, its replicas' addresses.

`local` reads a fleet file (JSON or YAML) on every call, so editing it takes effect
at the next step without a restart:

    {"rankers": ["http://127.0.0.1:8080"],
     "embedding_shards": [["127.0.0.1:50051"], ["127.0.0.1:50052"]]}

A server started with --admin-port is written `{"data": ADDRESS, "admin": ADDRESS}`
instead of a plain address (a plain one means admin shares the data port). The
controller only ever calls admin APIs (and the rankers' /metrics, also served on the
admin listener), so the Topology holds the admin address of every server.

`kubernetes` lists pods by label (deploy_controller/kube.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class DiscoveryError(Exception):
    """The fleet could not be found or its description is invalid."""


@dataclass(frozen=True)
class Topology:
    rankers: tuple[str, ...]  # base URLs, e.g. http://127.0.0.1:8080
    shards: tuple[tuple[str, ...], ...]  # shards[k] = gRPC addresses of shard k's replicas

    def replicas(self) -> list[tuple[int, str]]:
        """Every (shard index, replica address)."""
        return [(k, a) for k, reps in enumerate(self.shards) for a in reps]

    def to_json(self) -> dict[str, Any]:
        return {"rankers": list(self.rankers), "embedding_shards": [list(s) for s in self.shards]}


class Discovery(Protocol):
    async def topology(self) -> Topology: ...


def _admin_address(entry: object, what: str) -> str:
    """The address the controller calls: a plain entry, or an entry's "admin" address."""
    address = entry.get("admin") if isinstance(entry, dict) else entry
    if isinstance(entry, dict) and (set(entry) - {"data", "admin"}
                                    or not isinstance(entry.get("data", ""), str)):
        address = None
    if not isinstance(address, str) or not address:
        raise DiscoveryError(f"{what} must be an address or {{\"data\": ADDRESS, "
                             f"\"admin\": ADDRESS}}, got {entry!r}")
    return address


def parse_topology(raw: object, where: str) -> Topology:
    """Validate a fleet description (the fleet file's shape)."""
    if not isinstance(raw, dict):
        raise DiscoveryError(f"{where}: must be an object with 'rankers' and 'embedding_shards'")
    listed = raw.get("rankers")
    shards = raw.get("embedding_shards")
    if not isinstance(listed, list):
        raise DiscoveryError(f"{where}: 'rankers' must be a list of base URLs, got {listed!r}")
    rankers = [_admin_address(r, f"{where}: ranker {i}") for i, r in enumerate(listed)]
    for r in rankers:
        if not r.startswith(("http://", "https://")):
            raise DiscoveryError(f"{where}: ranker {r!r} must be an http(s):// base URL")
    if not isinstance(shards, list) or not shards:
        raise DiscoveryError(
            f"{where}: 'embedding_shards' must be a non-empty list (one entry per shard), "
            f"got {shards!r}")
    out: list[tuple[str, ...]] = []
    for k, reps in enumerate(shards):
        if isinstance(reps, (str, dict)):
            reps = [reps]  # one replica may be written without the inner list
        if not isinstance(reps, list) or not reps:
            raise DiscoveryError(
                f"{where}: embedding_shards[{k}] must be a non-empty list of host:port, "
                f"got {reps!r}")
        out.append(tuple(_admin_address(a, f"{where}: embedding_shards[{k}]") for a in reps))
    if len(set(rankers)) != len(rankers):
        raise DiscoveryError(f"{where}: duplicate ranker URLs")
    return Topology(tuple(rankers), tuple(out))


def load_fleet_file(path: Path) -> Topology:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DiscoveryError(f"fleet file {path}: {e.strerror or e}") from None
    raw: object
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DiscoveryError(f"fleet file {path}: invalid YAML: {e}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DiscoveryError(f"fleet file {path}: invalid JSON: {e}") from None
    return parse_topology(raw, f"fleet file {path}")


class LocalDiscovery:
    """The fleet file, re-read on every call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def topology(self) -> Topology:
        return load_fleet_file(self.path)


class StaticDiscovery:
    """A fixed topology (tests, and the fake fleet)."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology

    async def topology(self) -> Topology:
        return self._topology

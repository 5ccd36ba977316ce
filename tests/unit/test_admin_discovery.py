"""Discovery names the servers' admin addresses (--admin-port): the fleet file's
{"data", "admin"} entries and the kubernetes admin container ports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import DiscoveryError, parse_topology
from deploy_controller.kube import topology_from_pods

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"


def test_fleet_entries_with_admin_addresses_and_plain_ones() -> None:
    topo = parse_topology({
        "rankers": [{"data": "http://10.0.0.1:8080", "admin": "http://10.0.0.1:8081"},
                    "http://10.0.0.2:8080"],
        "embedding_shards": [{"data": "10.0.1.1:50051", "admin": "10.0.1.1:50061"},
                             ["10.0.1.2:50051", {"admin": "10.0.1.3:50061"}]]}, "fleet")
    assert topo.rankers == ("http://10.0.0.1:8081", "http://10.0.0.2:8080")
    assert topo.shards == (("10.0.1.1:50061",), ("10.0.1.2:50051", "10.0.1.3:50061"))


@pytest.mark.parametrize("entry", [{"data": "http://a:1"}, {"admin": ""},
                                   {"admin": "http://a:2", "extra": 1}, {"admin": 5}, 7])
def test_a_bad_admin_entry_is_named(entry: object) -> None:
    with pytest.raises(DiscoveryError, match="ranker 0 must be an address or"):
        parse_topology({"rankers": [entry], "embedding_shards": [["a:1"]]}, "fleet")


def _pods(name: str) -> list[Any]:
    return list(ApiClient().deserialize((FIXTURES / name).read_text(), "V1PodList",
                                        "application/json").items)


def test_kubernetes_uses_the_admin_ports() -> None:
    cfg = replace(ControllerConfig(), k8s_num_shards=2, k8s_ranker_admin_port=8081,
                  k8s_shard_admin_port=50061)
    topo = topology_from_pods(_pods("rankers.json"), _pods("shards_statefulset.json"), cfg)
    assert topo.rankers == ("http://10.12.1.21:8081", "http://10.12.2.8:8081")
    assert topo.shards == (("10.12.3.10:50061", "10.12.3.12:50061"), ("10.12.3.11:50061",))

"""Discovery: fleet files (JSON and YAML) and Kubernetes pods from recorded API objects."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import DiscoveryError, LocalDiscovery, Topology, load_fleet_file
from deploy_controller.kube import KubernetesDiscovery, topology_from_pods

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"
FLEET = {"rankers": ["http://127.0.0.1:8080"],
         "embedding_shards": [["127.0.0.1:50051"], ["127.0.0.1:50052", "127.0.0.1:50062"]]}


def test_fleet_file_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text(json.dumps(FLEET))
    (tmp_path / "f.yaml").write_text(
        "rankers:\n  - http://127.0.0.1:8080\nembedding_shards:\n  - [127.0.0.1:50051]\n"
        "  - [127.0.0.1:50052, 127.0.0.1:50062]\n")
    want = Topology(("http://127.0.0.1:8080",),
                    (("127.0.0.1:50051",), ("127.0.0.1:50052", "127.0.0.1:50062")))
    assert load_fleet_file(tmp_path / "f.json") == want
    assert load_fleet_file(tmp_path / "f.yaml") == want
    assert want.replicas() == [(0, "127.0.0.1:50051"), (1, "127.0.0.1:50052"),
                               (1, "127.0.0.1:50062")]


def test_local_discovery_rereads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(FLEET))
    d = LocalDiscovery(path)
    assert len(asyncio.run(d.topology()).rankers) == 1
    path.write_text(json.dumps({**FLEET, "rankers": ["http://a:1", "http://b:2"]}))
    assert asyncio.run(d.topology()).rankers == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(("text", "needle"), [
    ("{", "invalid JSON"),
    ("[]", "must be an object"),
    (json.dumps({"rankers": ["127.0.0.1:8080"], "embedding_shards": [["a:1"]]}), "http"),
    (json.dumps({"rankers": [], "embedding_shards": []}), "non-empty"),
    (json.dumps({"rankers": [], "embedding_shards": [[]]}), "embedding_shards[0]"),
    (json.dumps({"rankers": ["http://a", "http://a"], "embedding_shards": ["a:1"]}), "duplicate"),
])
def test_fleet_file_errors_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "fleet.json"
    path.write_text(text)
    with pytest.raises(DiscoveryError, match=None) as e:
        load_fleet_file(path)
    assert needle in str(e.value)


def test_missing_fleet_file(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="fleet file"):
        load_fleet_file(tmp_path / "nope.json")


class RecordedApi:
    """CoreV1Api.list_namespaced_pod answering with recorded PodList JSON."""

    def __init__(self, pages: dict[str, list[str]]) -> None:
        self.pages = pages
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._api = ApiClient()

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
        self.calls.append((namespace, kwargs))
        files = self.pages[kwargs["label_selector"]]
        idx = 1 if kwargs.get("_continue") else 0
        text = (FIXTURES / files[idx]).read_text()
        return self._api.deserialize(text, "V1PodList", "application/json")


CFG = ControllerConfig(k8s_namespace="ads-serving")


def test_kubernetes_statefulset_ordinals() -> None:
    api = RecordedApi({CFG.k8s_ranker_selector: ["rankers.json"],
                       CFG.k8s_shard_selector: ["shards_statefulset.json"]})
    cfg = replace(CFG, k8s_num_shards=2)
    topo = asyncio.run(KubernetesDiscovery(cfg, api).topology())
    # Pending and terminating rankers are left out; shard-3 is not Ready.
    assert topo.rankers == ("http://10.12.1.21:8080", "http://10.12.2.8:8080")
    assert topo.shards == (("10.12.3.10:50051", "10.12.3.12:50051"), ("10.12.3.11:50051",))
    assert {ns for ns, _ in api.calls} == {"ads-serving"}


def test_kubernetes_shard_label_and_pagination() -> None:
    api = RecordedApi({CFG.k8s_ranker_selector: ["rankers.json"],
                       CFG.k8s_shard_selector: ["shards_labelled_page1.json",
                                                "shards_labelled_page2.json"]})
    topo = asyncio.run(KubernetesDiscovery(CFG, api).topology())
    assert topo.shards == (("10.12.3.10:50051", "10.12.3.11:50051"),
                           ("10.12.3.12:50051", "10.12.3.13:50051"))
    shard_calls = [kw for _, kw in api.calls if kw["label_selector"] == CFG.k8s_shard_selector]
    assert len(shard_calls) == 2 and shard_calls[1]["_continue"].startswith("eyJ")


def _pods(name: str) -> list[Any]:
    return list(ApiClient().deserialize((FIXTURES / name).read_text(), "V1PodList",
                                        "application/json").items)


def test_ordinals_without_num_shards_is_an_error() -> None:
    with pytest.raises(DiscoveryError, match="k8s_num_shards"):
        topology_from_pods([], _pods("shards_statefulset.json"), CFG)


def test_a_shard_without_ready_replica_fails_discovery() -> None:
    pods = _pods("shards_statefulset.json")
    cfg = replace(CFG, k8s_num_shards=4)
    with pytest.raises(DiscoveryError, match=r"\[3\]"):
        topology_from_pods([], pods, cfg)
    with pytest.raises(DiscoveryError, match="no ready"):
        topology_from_pods([], [], cfg)


def test_api_errors_become_discovery_errors() -> None:
    class Broken:
        def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
            raise RuntimeError("403 Forbidden: pods is forbidden")

    with pytest.raises(DiscoveryError, match="Forbidden"):
        asyncio.run(KubernetesDiscovery(CFG, Broken()).topology())

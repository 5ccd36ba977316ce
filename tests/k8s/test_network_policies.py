"""NetworkPolicies of every overlay: default deny, who reaches whom, admin ports for the
controller only, and selectors and ports that name real pods and ports."""

from __future__ import annotations

from tests.k8s.manifests import (
    COMPONENT,
    Obj,
    by_component,
    containers,
    named,
    of_kind,
    pod_labels,
    resolve_port,
    selector_matches,
    workloads,
)


def _peer_allows(peer: Obj, src_labels: dict[str, str], ns_labels: dict[str, str]) -> bool:
    """Does this `from` peer admit a pod of OUR namespace (labels ns_labels) with src_labels?"""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        return selector_matches(peer["namespaceSelector"], ns_labels) and selector_matches(
            peer.get("podSelector", {}), src_labels)
    return selector_matches(peer.get("podSelector"), src_labels)


def reachable(objs: list[Obj], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Kubernetes NetworkPolicy ingress semantics for a connection inside the namespace."""
    (ns,) = of_kind(objs, "Namespace")
    ns_labels = {**ns["metadata"].get("labels", {}),
                 "kubernetes.io/metadata.name": ns["metadata"]["name"]}
    policies = [p for p in of_kind(objs, "NetworkPolicy")
                if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selector_matches(p["spec"]["podSelector"], dst)]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = [x["port"] for x in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            if "from" not in rule or any(_peer_allows(peer, src, ns_labels) for peer in rule["from"]):
                return True
    return False


def test_every_pod_is_under_default_deny(objs: list[Obj]) -> None:
    deny = named(objs, "NetworkPolicy", "hybrid-serving-default-deny-ingress")
    assert deny["spec"]["policyTypes"] == ["Ingress"] and not deny["spec"].get("ingress")
    for w in workloads(objs):
        assert selector_matches(deny["spec"]["podSelector"], pod_labels(w)), w["metadata"]["name"]


def _port(objs: list[Obj], component: str, name: str) -> int:
    """The container port `name` of a component's pods (the same in every workload)."""
    found = {resolve_port(c, name) for w in by_component(objs, component) for c in containers(w)}
    (port,) = found
    assert port is not None, f"{component} declares no {name} port"
    return port


def test_who_reaches_whom(objs: list[Obj]) -> None:
    """Only rankers reach the shards' data port; only the controller reaches the admin
    ports (shards' and rankers'); none of our pods reaches the rankers' data port or the
    controller (deployctl comes through port-forward or a labelled pod)."""
    pods = {pod_labels(w).get(COMPONENT, "?"): pod_labels(w) for w in workloads(objs)}
    shard = pods["embedding-shard"]
    grpc = _port(objs, "embedding-shard", "grpc")
    allowed = {src for src, labels in pods.items() if reachable(objs, labels, shard, grpc)}
    assert allowed == {"ranker"}
    assert not {s for s, lb in pods.items() if reachable(objs, lb, pods["ranker"], 8080)}
    assert not {s for s, lb in pods.items() if reachable(objs, lb, pods["deploy-controller"], 8090)}
    assert not any(reachable(objs, lb, shard, 9100) for lb in pods.values()), "metrics: Prometheus only"
    client = {"hybrid-serving/ranker-client": "true"}
    assert reachable_from_any_namespace(objs, client, pods["ranker"], 8080)
    assert not reachable_from_any_namespace(objs, client, shard, grpc)


def test_admin_ports_are_reachable_from_the_controller_only(objs: list[Obj]) -> None:
    """Issue 11, finding 7: admin is on ports of its own, and the policies open those to
    the controller's pods and nothing else (no other pod of ours, no other namespace)."""
    pods = {pod_labels(w).get(COMPONENT, "?"): pod_labels(w) for w in workloads(objs)}
    for component in ("embedding-shard", "ranker"):
        admin = _port(objs, component, "admin")
        data = _port(objs, component, "grpc" if component == "embedding-shard" else "http")
        assert admin != data
        dst = pods[component]
        assert {s for s, lb in pods.items() if reachable(objs, lb, dst, admin)} == {
            "deploy-controller"}, component
        for p in of_kind(objs, "NetworkPolicy"):
            if not selector_matches(p["spec"]["podSelector"], dst):
                continue
            for rule in p["spec"].get("ingress", []):
                if admin in [x["port"] for x in rule.get("ports", [])]:
                    assert all("namespaceSelector" not in peer and peer.get("podSelector", {})
                               .get("matchLabels", {}).get(COMPONENT) == "deploy-controller"
                               for peer in rule["from"]), (p["metadata"]["name"], rule)


def reachable_from_any_namespace(objs: list[Obj], src: dict[str, str], dst: dict[str, str],
                                 port: int) -> bool:
    for p in of_kind(objs, "NetworkPolicy"):
        if not selector_matches(p["spec"]["podSelector"], dst):
            continue
        for rule in p["spec"].get("ingress", []):
            if port not in [x["port"] for x in rule.get("ports", [])]:
                continue
            for peer in rule.get("from", []):
                if peer.get("namespaceSelector") == {} and selector_matches(
                        peer.get("podSelector", {}), src):
                    return True
    return False


def test_policy_selectors_and_ports_are_real(objs: list[Obj]) -> None:
    for p in of_kind(objs, "NetworkPolicy"):
        targets = [w for w in workloads(objs) if selector_matches(p["spec"]["podSelector"], pod_labels(w))]
        assert targets, f"NetworkPolicy {p['metadata']['name']} selects no pods"
        for rule in p["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for w in targets:
                    assert any(resolve_port(c, port["port"]) for c in containers(w)), (
                        p["metadata"]["name"], port, w["metadata"]["name"])
            for peer in rule.get("from", []):
                # A peer named by component is one of ours and must exist (client peers,
                # by hybrid-serving/*-client labels, are other teams' pods).
                if COMPONENT in (peer.get("podSelector") or {}).get("matchLabels", {}):
                    assert "namespaceSelector" not in peer
                    assert any(selector_matches(peer["podSelector"], pod_labels(w))
                               for w in workloads(objs)), (p["metadata"]["name"], peer)

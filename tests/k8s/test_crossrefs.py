"""The rendered objects refer to each other correctly: selectors, ports, names, policies.

Each test runs on every overlay. What the servers themselves accept (flags, routes,
health services) is in test_servers.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s.manifests import (
    K8S,
    Obj,
    containers,
    map_selector_matches,
    matching_workloads,
    mounts,
    named,
    namespace_of,
    of_kind,
    pod_labels,
    resolve_env,
    resolve_port,
    selector_matches,
    shared_config,
    template,
    workloads,
)

COMPONENT = "app.kubernetes.io/component"
SHARD_LABEL = "hybrid-serving/shard"
SERVING = ("ranker", "embedding-shard", "deploy-controller")


def by_component(objs: list[Obj], component: str) -> list[Obj]:
    return [w for w in workloads(objs) if pod_labels(w).get(COMPONENT) == component]


def num_shards(objs: list[Obj]) -> int:
    return int(shared_config(objs)["data"]["NUM_SHARDS"])


# ---------------------------------------------------------------- workloads and Services

def test_workload_selectors_match_their_templates(objs: list[Obj]) -> None:
    for w in workloads(objs):
        if w["kind"] == "Job":
            continue
        assert selector_matches(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]
        others = [o["metadata"]["name"] for o in workloads(objs)
                  if o is not w and selector_matches(w["spec"]["selector"], pod_labels(o))]
        assert not others, f"{w['metadata']['name']}'s selector also owns {others}"


def test_services_select_pods_and_target_declared_ports(objs: list[Obj]) -> None:
    for svc in of_kind(objs, "Service"):
        name = svc["metadata"]["name"]
        backends = matching_workloads(
            objs, lambda labels, s=svc: map_selector_matches(s["spec"]["selector"], labels))
        assert backends, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in backends:
                hits = [resolve_port(c, target) for c in containers(w)]
                assert any(h is not None for h in hits), (
                    f"Service {name} port {port['name']} targets {target!r}, which "
                    f"{w['metadata']['name']} does not declare")


def test_shard_topology(objs: list[Obj]) -> None:
    """NUM_SHARDS StatefulSets, shard k labelled k, each behind its own headless Service
    that selects exactly its pods; the ranker names those Services in shard order."""
    s = num_shards(objs)
    ns = namespace_of(objs)
    sets = by_component(objs, "embedding-shard")
    assert sorted(int(pod_labels(w)[SHARD_LABEL]) for w in sets) == list(range(s))
    (ranker,) = by_component(objs, "ranker")
    env = resolve_env(objs, ranker, containers(ranker)[0])
    targets = env["RANKER_EMBEDDING_SHARDS"].split(",")
    assert len(targets) == s
    for k in range(s):
        sts = named(objs, "StatefulSet", f"embedding-shard-{k}")
        assert pod_labels(sts)[SHARD_LABEL] == str(k)
        svc = named(objs, "Service", sts["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None", "dns:/// needs a headless Service"
        assert not svc["spec"].get("publishNotReadyAddresses", False)
        owners = matching_workloads(
            objs, lambda labels, sv=svc: map_selector_matches(sv["spec"]["selector"], labels))
        assert owners == [sts], f"Service {svc['metadata']['name']} must select shard {k} only"
        (grpc_port,) = [p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert targets[k] == (f"dns:///{svc['metadata']['name']}.{ns}.svc.cluster.local:"
                              f"{grpc_port}")


def test_shard_replicas_spread_within_their_shard(objs: list[Obj]) -> None:
    for sts in by_component(objs, "embedding-shard"):
        terms = template(sts)["spec"]["affinity"]["podAntiAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"]
        sel = terms[0]["podAffinityTerm"]["labelSelector"]
        peers = [w["metadata"]["name"] for w in workloads(objs)
                 if selector_matches(sel, pod_labels(w))]
        assert peers == [sts["metadata"]["name"]]


def test_pdbs_cover_exactly_one_workload_each(objs: list[Obj]) -> None:
    covered = []
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        hits = [w for w in workloads(objs) if selector_matches(pdb["spec"]["selector"], pod_labels(w))]
        assert len(hits) == 1, f"PDB {pdb['metadata']['name']} selects {len(hits)} workloads"
        assert pdb["spec"].get("maxUnavailable") == 1
        covered.append(hits[0]["metadata"]["name"])
    expected = {w["metadata"]["name"] for w in by_component(objs, "embedding-shard")} | {"ranker"}
    assert set(covered) == expected


# ---------------------------------------------------------------- references by name

def test_references_resolve(objs: list[Obj], overlay: str) -> None:
    """PVCs, ConfigMaps and Secrets that pods use exist (prod's admin Secret is created
    out of band, and is the only thing that may be missing)."""
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    external = set()
    for w in workloads(objs):
        for v in template(w)["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in present
            if "secret" in v and ("Secret", v["secret"]["secretName"]) not in present:
                external.add(v["secret"]["secretName"])
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in present, v
        for c in containers(w):
            env = resolve_env(objs, w, c)  # fails on a missing ConfigMap, Secret or key
            # $(VAR) expands only names defined EARLIER in the list (and patches reorder it).
            left = {k: v for k, v in env.items() if re.search(r"\$\([A-Za-z_]", v)}
            assert not left, f"{w['metadata']['name']}: unexpanded references in {left}"
    assert external == (set() if overlay == "dev" else {"hybrid-serving-admin"})


def test_admin_secret_keys(objs: list[Obj], overlay: str) -> None:
    """Shards and rankers get only the fleet token; the controller both tokens."""
    for w in workloads(objs):
        comp = pod_labels(w).get(COMPONENT)
        for v in template(w)["spec"].get("volumes", []):
            if "secret" not in v:
                continue
            keys = {i["key"] for i in v["secret"]["items"]}
            want = {"controller-token", "fleet-token"} if comp == "deploy-controller" else {"fleet-token"}
            assert keys == want, (w["metadata"]["name"], keys)
            assert v["secret"]["secretName"] == "hybrid-serving-admin"
    if overlay == "dev":
        (secret,) = of_kind(objs, "Secret")
        assert set(secret["data"]) == {"controller-token", "fleet-token"}


def test_model_store_is_read_only_for_servers(objs: list[Obj]) -> None:
    for w in workloads(objs):
        comp = pod_labels(w).get(COMPONENT)
        for c in containers(w):
            store = [m for m in mounts(w, c) if m.pvc == "model-store"]
            if comp in SERVING:
                assert store, f"{w['metadata']['name']} does not mount the model store"
            for m in store:
                if comp in SERVING:
                    assert m.read_only and m.volume["persistentVolumeClaim"].get("readOnly")
                else:  # the dev demo-store Job is the store's one writer
                    assert comp == "demo-store" and not m.read_only


# ---------------------------------------------------------------- RBAC

def test_controller_may_list_pods_and_write_the_desired_state_only(objs: list[Obj]) -> None:
    ns = namespace_of(objs)
    (ctl,) = by_component(objs, "deploy-controller")
    spec = template(ctl)["spec"]
    sa = named(objs, "ServiceAccount", spec["serviceAccountName"])
    assert spec["automountServiceAccountToken"] is True
    bindings = [b for b in of_kind(objs, "RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa["metadata"]["name"]
                       and s.get("namespace") == ns for s in b["subjects"])]
    assert len(bindings) == 1
    role = named(objs, bindings[0]["roleRef"]["kind"], bindings[0]["roleRef"]["name"])
    assert role["kind"] == "Role", "namespaced access only"
    rule, desired = role["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert {"list"} <= set(rule["verbs"]) <= {"get", "list", "watch"}
    # Writes: the one desired-state ConfigMap, nothing else (not even other ConfigMaps).
    assert desired["apiGroups"] == [""] and desired["resources"] == ["configmaps"]
    assert desired["resourceNames"] == ["hybrid-serving-desired-state"]
    assert set(desired["verbs"]) == {"get", "patch"}
    named(objs, "ConfigMap", "hybrid-serving-desired-state")
    assert not of_kind(objs, "ClusterRole") and not of_kind(objs, "ClusterRoleBinding")
    for w in workloads(objs):
        if w is not ctl:
            assert template(w)["spec"].get("automountServiceAccountToken") is False, (
                f"{w['metadata']['name']} never calls the API server: no token")


# ---------------------------------------------------------------- network policies

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


# ---------------------------------------------------------------- pods' hygiene

def test_security_context(objs: list[Obj]) -> None:
    """The restricted Pod Security Standard, and a read-only root filesystem."""
    for w in workloads(objs):
        pod = template(w)["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert any(m.path == "/tmp" and "emptyDir" in m.volume for m in mounts(w, c)), (
                "a writable /tmp (HOME) on a read-only root")


def test_resources_and_gpu(objs: list[Obj], overlay: str) -> None:
    for w in workloads(objs):
        for c in containers(w):
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), w["metadata"]["name"]
            assert "memory" in res["limits"], w["metadata"]["name"]
    (ranker,) = by_component(objs, "ranker")
    limits = containers(ranker)[0]["resources"]["limits"]
    tolerations = template(ranker)["spec"].get("tolerations", [])
    if overlay == "dev":
        assert "nvidia.com/gpu" not in limits and not tolerations
    else:
        assert limits["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    gpu_users = [w["metadata"]["name"] for w in workloads(objs)
                 if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(w))]
    assert gpu_users == ([] if overlay == "dev" else ["ranker"])


def test_prometheus_annotations_name_a_metrics_port(objs: list[Obj]) -> None:
    for comp in SERVING:
        (w, *_) = by_component(objs, comp)
        ann = template(w)["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        assert any(resolve_port(c, int(ann["prometheus.io/port"])) for c in containers(w))


def test_service_monitors(objs: list[Obj], overlay: str) -> None:
    monitors = of_kind(objs, "ServiceMonitor")
    assert len(monitors) == (3 if overlay == "prod" else 0)
    for sm in monitors:
        services = [s for s in of_kind(objs, "Service")
                    if selector_matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert services, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert ep["path"] == "/metrics"
            for s in services:
                assert ep["port"] in [p["name"] for p in s["spec"]["ports"]], (sm, s)


# ---------------------------------------------------------------- the docs

def test_readme_says_how_to_apply_and_roll_out() -> None:
    text = (K8S / "README.md").read_text()
    for needle in ("kubectl apply -k k8s/overlays/dev", "kubectl apply -k k8s/overlays/prod",
                   "port-forward", "deployctl", "rollout ads_ctr v2",
                   "create secret generic hybrid-serving-admin", "ensure-kustomize.sh"):
        assert needle in text, needle


def test_image_user_matches_run_as_user(objs: list[Obj]) -> None:
    dockerfile = (K8S / "image" / "Dockerfile").read_text()
    m = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert m, "the image must name a numeric USER"
    for w in workloads(objs):
        psc: dict[str, Any] = template(w)["spec"]["securityContext"]
        assert (psc["runAsUser"], psc["runAsGroup"]) == (int(m.group(1)), int(m.group(2)))


@pytest.mark.parametrize("path", sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")))
def test_yaml_files_parse(path: str) -> None:
    import yaml

    docs = list(yaml.safe_load_all((K8S / path).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), path

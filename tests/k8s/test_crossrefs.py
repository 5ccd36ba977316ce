"""The rendered objects refer to each other correctly: selectors, ports, names, policies.

Each test runs on every overlay. What the servers themselves accept (flags, routes,
health services) is in test_servers.py; who may reach whom, in test_network_policies.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.k8s.manifests import (
    COMPONENT,
    K8S,
    Obj,
    by_component,
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

SHARD_LABEL = "hybrid-serving/shard"
SERVING = ("ranker", "embedding-shard", "deploy-controller")


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

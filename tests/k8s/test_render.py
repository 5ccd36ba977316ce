"""Every overlay renders with a real kustomize, and every object is valid Kubernetes.

Objects are validated with kubernetes-validate (strict: unknown fields are errors)
against the oldest Kubernetes these manifests support and the newest schema it ships.
"""

from __future__ import annotations

import copy
from collections import Counter

import kubernetes_validate
import pytest

from tests.k8s.manifests import Obj, of_kind, render

# Oldest supported: native gRPC probes are GA since 1.27, PDB unhealthyPodEvictionPolicy
# since 1.31, the apps.kubernetes.io/pod-index label since 1.28.
MIN_VERSION = "1.31.0"
VERSIONS = (MIN_VERSION, kubernetes_validate.latest_version())
# Custom resources kubernetes-validate has no schema for; test_crossrefs checks them.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
NAMESPACES = {"dev": "hybrid-serving-dev", "prod": "ads-serving"}


def test_latest_schema_is_new_enough() -> None:
    major, minor = (int(x) for x in kubernetes_validate.latest_version().split(".")[:2])
    assert (major, minor) >= (1, 37), kubernetes_validate.latest_version()


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates(objs: list[Obj], version: str) -> None:
    checked = 0
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.caught.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} invalid for {version} at {where}: "
                        f"{e.caught.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{o['apiVersion']} {o['kind']} has no {version} schema and is not a "
                        "known custom resource")
        checked += 1
    assert checked >= 15


def test_validation_is_strict(kustomize: tuple[str, ...]) -> None:
    """A typo in a pod spec must fail, or the test above proves nothing."""
    (ranker,) = [o for o in render("dev") if o["kind"] == "Deployment"
                 and o["metadata"]["name"] == "ranker"]
    bad = copy.deepcopy(ranker)
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, MIN_VERSION, strict=True)
    bad = copy.deepcopy(ranker)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, MIN_VERSION, strict=True)


def test_one_namespace_unique_names(objs: list[Obj], overlay: str) -> None:
    (ns,) = of_kind(objs, "Namespace")
    assert ns["metadata"]["name"] == NAMESPACES[overlay]
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACES[overlay], o["metadata"]["name"]
    dupes = [k for k, n in Counter((o["kind"], o["metadata"]["name"]) for o in objs).items() if n > 1]
    assert not dupes


def test_expected_objects(objs: list[Obj], overlay: str) -> None:
    kinds = Counter(o["kind"] for o in objs)
    shards = 2 if overlay == "dev" else 4
    assert kinds["StatefulSet"] == shards
    assert kinds["PodDisruptionBudget"] == shards + 1
    assert kinds["Service"] == shards + 2
    assert kinds["Deployment"] == 2
    assert kinds["NetworkPolicy"] == 4
    assert (kinds["Role"], kinds["RoleBinding"], kinds["ServiceAccount"]) == (1, 1, 1)
    assert kinds["Secret"] == (1 if overlay == "dev" else 0)
    assert kinds["ServiceMonitor"] == (0 if overlay == "dev" else 3)
    assert kinds["Job"] == (1 if overlay == "dev" else 0)

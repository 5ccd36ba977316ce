"""discovery=kubernetes: the fleet from pods listed by label with the official client.

Only pods that can take work count: phase Running, a pod IP, the Ready condition
True, and not being deleted. Every address is the one the controller calls: the pods'
admin port (k8s_*_admin_port, their --admin-port) when set, else their data port.
Rankers are `http://<podIP>:<ranker port>`; each
embedding-shard pod is one replica of the shard named by its shard label, or, without
that label, of shard `ordinal mod k8s_num_shards` where the ordinal is the StatefulSet
pod index (label `apps.kubernetes.io/pod-index`, else the name's `-N` suffix). A shard
index with no ready replica fails discovery: a rollout must reach every shard.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import DiscoveryError, Topology

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
_ORDINAL = re.compile(r"-(\d+)$")


DESIRED_KEY = "desired-state.json"


class PodLister(Protocol):
    """The one call of kubernetes.client.CoreV1Api that discovery uses."""

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any: ...


class ConfigMapPatcher(Protocol):
    """The one call of kubernetes.client.CoreV1Api that the desired-state mirror uses."""

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any,
                                    **kwargs: Any) -> Any: ...


def pod_ready(pod: Any) -> bool:
    meta, status = pod.metadata, pod.status
    if meta is None or status is None or meta.deletion_timestamp is not None:
        return False
    if status.phase != "Running" or not status.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))


def shard_index(pod: Any, cfg: ControllerConfig) -> int:
    labels = pod.metadata.labels or {}
    name = pod.metadata.name or "?"
    raw = labels.get(cfg.k8s_shard_label)
    if raw is not None:
        if not str(raw).isdigit():
            raise DiscoveryError(f"pod {name}: label {cfg.k8s_shard_label}={raw!r} is not an index")
        return int(raw)
    if cfg.k8s_num_shards <= 0:
        raise DiscoveryError(f"pod {name} has no {cfg.k8s_shard_label} label and "
                             "k8s_num_shards is not set to derive it from the pod ordinal")
    ordinal = labels.get(POD_INDEX_LABEL)
    if ordinal is None:
        m = _ORDINAL.search(name)
        if m is None:
            raise DiscoveryError(f"pod {name}: no shard label, pod-index label or -N ordinal")
        ordinal = m.group(1)
    return int(ordinal) % cfg.k8s_num_shards


def topology_from_pods(rankers: list[Any], shards: list[Any], cfg: ControllerConfig) -> Topology:
    """Pure mapping from pod objects to a Topology (unit-tested on recorded objects)."""
    ranker_port = cfg.k8s_ranker_admin_port or cfg.k8s_ranker_port
    shard_port = cfg.k8s_shard_admin_port or cfg.k8s_shard_port
    urls = sorted(f"http://{p.status.pod_ip}:{ranker_port}" for p in rankers if pod_ready(p))
    by_shard: dict[int, list[str]] = {}
    for p in shards:
        if pod_ready(p):
            by_shard.setdefault(shard_index(p, cfg), []).append(
                f"{p.status.pod_ip}:{shard_port}")
    if not by_shard:
        raise DiscoveryError(f"no ready embedding-shard pods match {cfg.k8s_shard_selector!r} "
                             f"in namespace {cfg.k8s_namespace}")
    count = cfg.k8s_num_shards or max(by_shard) + 1
    missing = [k for k in range(count) if k not in by_shard]
    if missing or max(by_shard) >= count:
        raise DiscoveryError(f"embedding shards {missing or sorted(by_shard)} have no ready "
                             f"replica (expected shards 0..{count - 1})")
    return Topology(tuple(urls), tuple(tuple(sorted(by_shard[k])) for k in range(count)))


def _core_api() -> PodLister:
    """CoreV1Api from the in-cluster service account, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    api: PodLister = client.CoreV1Api()  # type: ignore[assignment]  # keyword-only subset
    return api


class DesiredConfigMap:
    """Mirrors the desired-state document into a ConfigMap that shard and ranker pods mount
    (optional: true), so a pod restarted on any node reads what the fleet serves."""

    def __init__(self, cfg: ControllerConfig, api: ConfigMapPatcher | None = None) -> None:
        self.name, self.namespace = cfg.k8s_desired_configmap, cfg.k8s_namespace
        self._api: ConfigMapPatcher = api if api is not None else _core_api()  # type: ignore[assignment]

    def __call__(self, document: str) -> None:
        """Write it; raises OSError so the publisher reports and retries it like the file."""
        try:
            self._api.patch_namespaced_config_map(
                self.name, self.namespace, {"data": {DESIRED_KEY: document}},
                _request_timeout=5)
        except Exception as e:  # ApiException, connection errors
            raise OSError(f"ConfigMap {self.namespace}/{self.name}: {e}") from None


class KubernetesDiscovery:
    """Lists pods through the API server (in-cluster config, else the local kubeconfig)."""

    def __init__(self, cfg: ControllerConfig, api: PodLister | None = None) -> None:
        self.cfg = cfg
        self._api: PodLister = api if api is not None else _core_api()

    def _list(self, selector: str) -> list[Any]:
        pods: list[Any] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": 500}
            if token:
                kwargs["_continue"] = token
            try:
                page = self._api.list_namespaced_pod(self.cfg.k8s_namespace, **kwargs)
            except Exception as e:  # ApiException, connection errors: all mean "cannot see"
                raise DiscoveryError(f"listing pods {selector!r} in {self.cfg.k8s_namespace}: "
                                     f"{e}") from None
            pods.extend(page.items or [])
            meta = page.metadata
            # The generated models name `continue` var_continue (older ones _continue).
            token = (getattr(meta, "var_continue", None) or getattr(meta, "_continue", None)
                     if meta is not None else None)
            if not token:
                return pods

    async def topology(self) -> Topology:
        rankers, shards = await asyncio.gather(
            asyncio.to_thread(self._list, self.cfg.k8s_ranker_selector),
            asyncio.to_thread(self._list, self.cfg.k8s_shard_selector))
        return topology_from_pods(rankers, shards, self.cfg)

"""The manifests against the real servers: flags parsed by each server's own parser and
validated by its own config, probes on routes and health services the servers have,
ports that agree everywhere, and the controller's discovery run on the rendered fleet.

Paths the containers see (/models, /var/run/secrets/...) are mirrored under tmp_path
(ScratchRoot), so each server's validation checks that a path lies in a real mount.
"""

from __future__ import annotations

import base64
import os
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.k8s.manifests import (
    REPO,
    Obj,
    ScratchRoot,
    by_component,
    containers,
    expanded_args,
    iter_probes,
    mounts,
    named,
    namespace_of,
    of_kind,
    parse_equality_selector,
    pod_labels,
    quantity_bytes,
    quantity_cores,
    resolve_env,
    resolve_port,
    shared_config,
    template,
    workloads,
)

PRIVATE_BYTES_PER_PROCESS = 300e6  # embedding server target (issue 3, P3); 195 MB measured


def config_map(objs: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = shared_config(objs)["data"]
    return data


def desired_state_mount(root: ScratchRoot, path: Path | None) -> None:
    """The server reads the desired state from the controller's ConfigMap, mounted read-only."""
    assert path is not None
    m = root.mount_of(str(path).replace(str(root.root), "", 1))
    assert m is not None and m.read_only, path
    assert m.volume["configMap"] == {"name": "hybrid-serving-desired-state", "optional": True}
    assert path.name == "desired-state.json"  # the key the controller writes (kube.DESIRED_KEY)


def serves_get(app: Any, path: str) -> bool:
    """Does the app route `GET path` to a handler? (Asks the router itself: FastAPI
    includes routers lazily, so app.routes does not list them.)"""
    from starlette.routing import Match

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "app": app,
             "path_params": {}, "query_string": b"", "headers": []}
    return any(r.matches(scope)[0] == Match.FULL for r in app.router.routes)


def token_in(path: Path | str | None) -> str:
    assert path is not None
    return Path(path).read_text().strip()


def expected_fleet_token(objs: list[Obj]) -> str:
    secrets = of_kind(objs, "Secret")
    if not secrets:
        return ScratchRoot.PLACEHOLDER
    return base64.b64decode(secrets[0]["data"]["fleet-token"]).decode()


# ---------------------------------------------------------------- entry points

def test_commands_are_the_project_console_scripts(objs: list[Obj]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    want = {"embedding-shard": "embedding_server.__main__:main",
            "ranker": "ranker_server.__main__:main",
            "deploy-controller": "deploy_controller.__main__:main"}
    for comp, entry in want.items():
        for w in by_component(objs, comp):
            (c,) = template(w)["spec"]["containers"]
            assert scripts[c["command"][0]] == entry, (comp, c["command"])


# ---------------------------------------------------------------- embedding shards

@pytest.fixture
def shard_configs(objs: list[Obj], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> list[tuple[Obj, Any, ScratchRoot]]:
    """(StatefulSet, ServerConfig parsed from its args, scratch root) per shard."""
    import embedding_server.config as econf

    out = []
    for sts in by_component(objs, "embedding-shard"):
        (c,) = template(sts)["spec"]["containers"]
        argv, _ = expanded_args(objs, sts, c)
        root = ScratchRoot(tmp_path / sts["metadata"]["name"], objs, sts, c)
        limit = int(quantity_bytes(c["resources"]["limits"]["memory"]))
        # A fraction budget is taken of the container's limit (the server reads the cgroup).
        monkeypatch.setattr(econf, "total_memory_bytes", lambda limit=limit: limit)
        cfg = econf.config_from_args([root.localize(a) for a in argv[1:]])
        out.append((sts, cfg, root))
    return out


def test_shard_flags(objs: list[Obj], shard_configs: list[tuple[Obj, Any, ScratchRoot]]) -> None:
    cm = config_map(objs)
    s = int(cm["NUM_SHARDS"])
    assert len(shard_configs) == s
    for sts, cfg, root in shard_configs:
        (c,) = template(sts)["spec"]["containers"]
        k = int(sts["metadata"]["name"].rsplit("-", 1)[1])
        assert (cfg.shard, cfg.num_shards) == (k, s)
        assert cfg.preload == ((cm["MODEL"], cm["VERSION"]),)
        assert cfg.host == "0.0.0.0"
        assert cfg.port == resolve_port(c, "grpc")
        assert cfg.metrics_port == resolve_port(c, "metrics")
        assert cfg.admin_port == resolve_port(c, "admin") and cfg.admin_port not in (None, 0)
        assert cfg.admin_token == expected_fleet_token(objs), "admin RPCs need the fleet token"
        store_mount = root.mount_of(str(cfg.store).replace(str(root.root), "", 1))
        assert store_mount is not None and store_mount.pvc == "model-store" and store_mount.read_only
        desired_state_mount(root, cfg.desired_state)


def test_shard_memory_and_cpu(shard_configs: list[tuple[Obj, Any, ScratchRoot]]) -> None:
    """Both versions of a rollout fit the budget, and budget + private memory the limit;
    one worker process per requested core; SIGTERM's grace fits the pod's."""
    for sts, cfg, _ in shard_configs:
        (c,) = template(sts)["spec"]["containers"]
        res = c["resources"]
        limit = quantity_bytes(res["limits"]["memory"])
        assert cfg.memory_budget_bytes + cfg.workers * PRIVATE_BYTES_PER_PROCESS <= limit
        assert cfg.workers <= max(1, int(quantity_cores(res["requests"]["cpu"])))
        assert quantity_bytes(res["requests"]["memory"]) <= limit
        assert cfg.grace_period_s + 5 <= template(sts)["spec"]["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", ["prod"])
def test_prod_shards_hold_two_versions_of_the_big_table(
        shard_configs: list[tuple[Obj, Any, ScratchRoot]]) -> None:
    table_bytes = 450_000_000 * (4 + 32 // 2)  # fp16 scale + bias, 32 INT4 values per row
    assert table_bytes == 9_000_000_000
    for sts, cfg, _ in shard_configs:
        per_version = table_bytes / cfg.num_shards
        assert cfg.memory_budget_bytes >= 2 * per_version, sts["metadata"]["name"]
        (c,) = template(sts)["spec"]["containers"]
        res = c["resources"]
        assert res["requests"] == res["limits"], "Guaranteed QoS for the page-cache-heavy shards"


def test_shard_probes_use_grpc_health(shard_configs: list[tuple[Obj, Any, ScratchRoot]]) -> None:
    from grpc_health.v1 import health, health_pb2

    from embedding_server.server import SERVICE_NAME, _set_health
    from embedding_server.workers import _START_TIMEOUT_S

    servicer = health.HealthServicer()
    _set_health(servicer, health_pb2.HealthCheckResponse.SERVING)
    context = SimpleNamespace(set_code=lambda code: pytest.fail(f"health Check answered {code}"),
                              set_details=lambda d: None)
    for sts, cfg, _ in shard_configs:
        (c,) = template(sts)["spec"]["containers"]
        probes = dict(iter_probes(c))
        assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
        for kind, probe in probes.items():
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
            assert probe["grpc"]["port"] == cfg.port, f"{kind} must hit the gRPC port"
            service = probe["grpc"].get("service", "")
            assert service in ("", SERVICE_NAME)
            answer = servicer.Check(health_pb2.HealthCheckRequest(service=service), context)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        start = probes["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= _START_TIMEOUT_S, (
            "preload verifies every checksum before SERVING: allow the supervisor's timeout")


# ---------------------------------------------------------------- rankers

@pytest.fixture
def ranker_config(objs: list[Obj], tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[Obj, Any, dict[str, str]]:
    """(Deployment, RankerConfig from its RANKER_* environment, that environment)."""
    from ranker_server.__main__ import build_parser, config_from_args

    (dep,) = by_component(objs, "ranker")
    (c,) = template(dep)["spec"]["containers"]
    env = resolve_env(objs, dep, c)
    root = ScratchRoot(tmp_path / "ranker", objs, dep, c)
    dests = {a.dest.upper() for a in build_parser()._actions}
    for name in [n for n in os.environ if n.startswith("RANKER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("RANKER_"):
            assert name.removeprefix("RANKER_") in dests, f"{name} is no ranker-server flag"
            monkeypatch.setenv(name, root.localize(value))
        else:
            assert name in ("POD_NAMESPACE", "HOME"), name
    argv, _ = expanded_args(objs, dep, c)
    cfg = config_from_args(build_parser().parse_args([root.localize(a) for a in argv[1:]]))
    return dep, cfg, env


def test_ranker_config(objs: list[Obj], overlay: str,
                       ranker_config: tuple[Obj, Any, dict[str, str]]) -> None:
    dep, cfg, env = ranker_config
    (c,) = template(dep)["spec"]["containers"]
    cm = config_map(objs)
    assert (cfg.model, cfg.version) == (cm["MODEL"], cm["VERSION"])
    assert cfg.host == "0.0.0.0" and cfg.port == resolve_port(c, "http")
    assert cfg.admin_port == resolve_port(c, "admin") and cfg.admin_port not in (None, 0)
    assert cfg.device == ("cpu" if overlay == "dev" else "cuda")
    assert not cfg.local_tables
    assert cfg.embedding_shards == tuple((t,) for t in env["RANKER_EMBEDDING_SHARDS"].split(","))
    assert all(t[0].startswith("dns:///") for t in cfg.embedding_shards), "round_robin over DNS"
    assert cfg.admin_token() == expected_fleet_token(objs), "the controller calls /admin with it"
    (m,) = [m for m in mounts(dep, c) if env["RANKER_DESIRED_STATE"].startswith(m.path + "/")]
    assert m.read_only and m.volume["configMap"] == {"name": "hybrid-serving-desired-state",
                                                     "optional": True}
    assert cfg.desired_state is not None and cfg.desired_state.name == "desired-state.json"


def test_ranker_probes_and_drain(ranker_config: tuple[Obj, Any, dict[str, str]]) -> None:
    from ranker_server.app import create_app

    dep, cfg, _ = ranker_config
    (c,) = template(dep)["spec"]["containers"]
    app = create_app(cfg)
    assert not serves_get(app, "/no-such-path") and not serves_get(app, "/v1/rank")
    probes = dict(iter_probes(c))
    for kind, probe in probes.items():
        assert serves_get(app, probe["httpGet"]["path"]), (kind, probe["httpGet"]["path"])
        assert resolve_port(c, probe["httpGet"]["port"]) == cfg.port
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # /readyz fails when a shard is down: restarting rankers for that would not help.
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probes["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert serves_get(app, template(dep)["metadata"]["annotations"]["prometheus.io/path"])
    ready = probes["readinessProbe"]
    assert cfg.drain_grace_s >= ready["periodSeconds"] * ready["failureThreshold"], (
        "keep serving while not-ready until the readiness probe has seen it")
    assert cfg.drain_grace_s + cfg.drain_timeout_s < template(dep)["spec"]["terminationGracePeriodSeconds"]


# ---------------------------------------------------------------- controller

@pytest.fixture
def controller_config(objs: list[Obj], tmp_path: Path) -> tuple[Obj, Any, ScratchRoot]:
    from deploy_controller.__main__ import parse_args

    (dep,) = by_component(objs, "deploy-controller")
    (c,) = template(dep)["spec"]["containers"]
    argv, _ = expanded_args(objs, dep, c)
    root = ScratchRoot(tmp_path / "controller", objs, dep, c)
    cfg, _level = parse_args([root.localize(a) for a in argv[1:]])
    return dep, cfg.validate(), root


def test_controller_discovery_flags(objs: list[Obj],
                                    controller_config: tuple[Obj, Any, ScratchRoot]) -> None:
    _, cfg, _root = controller_config
    assert cfg.discovery == "kubernetes"
    assert cfg.k8s_namespace == namespace_of(objs)
    rankers = [w for w in workloads(objs)
               if all(pod_labels(w).get(k) == v
                      for k, v in parse_equality_selector(cfg.k8s_ranker_selector).items())]
    shards = [w for w in workloads(objs)
              if all(pod_labels(w).get(k) == v
                     for k, v in parse_equality_selector(cfg.k8s_shard_selector).items())]
    assert [w["metadata"]["name"] for w in rankers] == ["ranker"]
    assert shards == by_component(objs, "embedding-shard")
    (rc,) = template(rankers[0])["spec"]["containers"]
    assert cfg.k8s_ranker_port == resolve_port(rc, "http")
    assert cfg.k8s_ranker_admin_port == resolve_port(rc, "admin"), "the controller calls admin"
    for sts in shards:
        (sc,) = template(sts)["spec"]["containers"]
        assert cfg.k8s_shard_port == resolve_port(sc, "grpc")
        assert cfg.k8s_shard_admin_port == resolve_port(sc, "admin")
        assert cfg.k8s_shard_label in pod_labels(sts)
    assert cfg.k8s_num_shards == int(config_map(objs)["NUM_SHARDS"]) == len(shards)
    assert token_in(cfg.fleet_token_file) == expected_fleet_token(objs)
    assert token_in(cfg.admin_token_file)
    assert cfg.k8s_desired_configmap == "hybrid-serving-desired-state"
    assert cfg.reconcile_interval_s > 0


def test_controller_storage(controller_config: tuple[Obj, Any, ScratchRoot]) -> None:
    _, cfg, root = controller_config
    inside = str(cfg.journal).replace(str(root.root), "", 1)
    journal = root.mount_of(inside)
    assert journal is not None and journal.pvc == "deploy-controller-journal", "durable journal"
    assert not journal.read_only
    store = root.mount_of(str(cfg.store).replace(str(root.root), "", 1))
    assert store is not None and store.pvc == "model-store" and store.read_only


def test_controller_probes(controller_config: tuple[Obj, Any, ScratchRoot]) -> None:
    from deploy_controller.app import build_app

    dep, cfg, _ = controller_config
    (c,) = template(dep)["spec"]["containers"]
    app = build_app(cfg)
    assert not serves_get(app, "/no-such-path")
    for kind, probe in iter_probes(c):
        assert serves_get(app, probe["httpGet"]["path"]), (kind, probe["httpGet"]["path"])
        assert resolve_port(c, probe["httpGet"]["port"]) == cfg.port
    # Ready means the journal is open and discovery works, not merely alive.
    assert {k: p["httpGet"]["path"] for k, p in iter_probes(c)}["readinessProbe"] == "/readyz"
    assert serves_get(app, template(dep)["metadata"]["annotations"]["prometheus.io/path"])
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def _pod(name: str, labels: dict[str, str], ip: str) -> SimpleNamespace:
    ready = SimpleNamespace(type="Ready", status="True")
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels=labels, deletion_timestamp=None),
        status=SimpleNamespace(phase="Running", pod_ip=ip, conditions=[ready]))


def test_controller_discovers_the_rendered_fleet(objs: list[Obj],
                                                 controller_config: tuple[Obj, Any, ScratchRoot]
                                                 ) -> None:
    """Pods as the API server would create them from these templates, filtered by the
    controller's own selectors, give the topology: every shard with all its replicas."""
    from deploy_controller.kube import POD_INDEX_LABEL, topology_from_pods

    _, cfg, _ = controller_config
    pods: list[SimpleNamespace] = []
    for w in workloads(objs):
        if w["kind"] == "Job":
            continue
        for i in range(w["spec"]["replicas"]):
            labels = dict(pod_labels(w))
            if w["kind"] == "StatefulSet":
                labels[POD_INDEX_LABEL] = str(i)
            pods.append(_pod(f"{w['metadata']['name']}-{i}", labels, f"10.0.{len(pods) // 250}."
                             f"{len(pods) % 250 + 1}"))

    def listed(selector: str) -> list[SimpleNamespace]:
        sel = parse_equality_selector(selector)
        return [p for p in pods if all(p.metadata.labels.get(k) == v for k, v in sel.items())]

    topo = topology_from_pods(listed(cfg.k8s_ranker_selector), listed(cfg.k8s_shard_selector), cfg)
    assert len(topo.rankers) == named(objs, "Deployment", "ranker")["spec"]["replicas"]
    assert len(topo.shards) == cfg.k8s_num_shards
    for k, replicas in enumerate(topo.shards):
        want = named(objs, "StatefulSet", f"embedding-shard-{k}")["spec"]["replicas"]
        assert len(replicas) == want
        assert all(a.endswith(f":{cfg.k8s_shard_admin_port}") for a in replicas)


# ---------------------------------------------------------------- the dev demo-store Job

def test_demo_store_job(objs: list[Obj], overlay: str, tmp_path: Path) -> None:
    jobs = of_kind(objs, "Job")
    if overlay != "dev":
        assert not jobs
        return
    from modelpack.__main__ import _parser

    (job,) = jobs
    (c,) = containers(job)
    argv, _ = expanded_args(objs, job, c)
    assert argv[:3] == ["python", "-m", "modelpack"]
    root = ScratchRoot(tmp_path / "job", objs, job, c)
    args = _parser().parse_args([root.localize(a) for a in argv[3:]])
    assert args.cmd == "demo"
    store = root.mount_of(str(args.store).replace(str(root.root), "", 1))
    assert store is not None and store.pvc == "model-store" and not store.read_only


# ---------------------------------------------------------------- the README's commands

def test_readme_deployctl_commands_parse() -> None:
    from deploy_controller.cli import build_parser

    text = (REPO / "k8s" / "README.md").read_text()
    commands = [ln.split("deployctl", 1)[1].split() for ln in text.splitlines()
                if ln.startswith(".venv/bin/deployctl ")]
    assert len(commands) >= 3
    for argv in commands:
        build_parser().parse_args(argv)

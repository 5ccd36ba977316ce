"""The desired state: what the journal implies at every step, its file, the reconcile
loop over the fake fleet, and the servers' startup reading of it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deploy_controller import cli
from deploy_controller.desired import DesiredPublisher, target
from deploy_controller.executor import Executor
from deploy_controller.fake import FakeFleet, _Ranker
from deploy_controller.journal import Journal
from deploy_controller.kube import DESIRED_KEY, DesiredConfigMap
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.reconcile import Reconciler
from deploy_controller.state import Kind, Step, plan
from embedding_server.desired import read_desired, startup_versions
from modelpack import desired
from modelpack.desired import DesiredModel, DesiredStateError
from ranker_server.config import RankerConfig
from ranker_server.lifecycle import startup_plan
from tests.unit.controller_helpers import FAST, MakeConfig


def test_target_holds_the_new_version_only_once_every_shard_loaded_it(tmp_path: Path) -> None:
    r = Journal(tmp_path / "j.sqlite").create("m", "v1", "v2", [25, 100], 0.0)
    by = {step.name: target(replace(r, step=step)) for step in plan([25, 100])}
    for early in ("load_dense", "check_fit", "load_embeddings"):
        assert by[early] == ("v1", ("v1",), {"v1": 1.0}), early  # a corrupt v2 never spreads
    assert by["prepare"] == ("v1", ("v1", "v2"), {"v1": 1.0})
    assert by["shift:0"] == ("v1", ("v1", "v2"), {"v1": 1.0})  # the split before the shift
    assert by["bake:0"] == ("v1", ("v1", "v2"), {"v1": 0.75, "v2": 0.25})
    assert by["shift:1"] == ("v1", ("v1", "v2"), {"v1": 0.75, "v2": 0.25})
    assert by["bake:1"] == ("v2", ("v2", "v1"), {"v2": 1.0})
    for late in ("unload_old_rankers", "unload_old_shards", "succeeded"):
        assert by[late] == ("v2", ("v2",), {"v2": 1.0}), late


def test_target_of_a_rollback_drops_the_new_version(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    r = j.create("m", "v1", "v2", [100], 0.0)
    assert target(replace(r, step=Step(Kind.ROLLBACK_TRAFFIC))) == ("v1", ("v1", "v2"),
                                                                    {"v1": 1.0})
    for k in (Kind.UNLOAD_NEW_RANKERS, Kind.UNLOAD_NEW_SHARDS, Kind.ROLLED_BACK):
        assert target(replace(r, step=Step(k))) == ("v1", ("v1",), {"v1": 1.0})


def _harness(tmp_path: Path) -> tuple[FakeFleet, Journal, Executor, DesiredPublisher]:
    fleet = FakeFleet()
    journal = Journal(tmp_path / "journal.sqlite")
    pub = DesiredPublisher(journal, tmp_path / "desired.json", None)
    ex = Executor(journal, fleet, FAST, crash=lambda p: None, publisher=pub)
    return fleet, journal, ex, pub


def test_rollout_publishes_each_serving_state_atomically(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, journal, ex, _ = _harness(tmp_path)
    path = tmp_path / "desired.json"
    writes: list[dict[str, DesiredModel]] = []
    orig = desired.write

    def spy(p: Path, models: dict[str, DesiredModel]) -> None:
        orig(p, models)
        writes.append(desired.read(p))

    monkeypatch.setattr(desired, "write", spy)
    r = journal.create("m", "v1", "v2", [50, 100], 0.0)
    done = asyncio.run(ex.run(r.id))
    assert done.status == "succeeded"
    states = [(w["m"].active, w["m"].versions, w["m"].split) for w in writes]
    assert states == [("v1", ("v1",), {"v1": 1.0}),
                      ("v1", ("v1", "v2"), {"v1": 1.0}),
                      ("v1", ("v1", "v2"), {"v1": 0.5, "v2": 0.5}),
                      ("v2", ("v2", "v1"), {"v2": 1.0}),
                      ("v2", ("v2",), {"v2": 1.0})]
    seqs = [w["m"].seq for w in writes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".desired")]  # no temp left
    raw = json.loads(path.read_text())
    assert raw["models"]["m"]["rollout"] == r.id
    # A controller on a fresh journal keeps what the file says of models it never saw.
    pub2 = DesiredPublisher(Journal(tmp_path / "fresh.sqlite"), path, None)
    pub2.publish()
    assert desired.read(path)["m"].active == "v2"


def test_publisher_rewrites_an_unreadable_file(tmp_path: Path) -> None:
    _, journal, _, pub = _harness(tmp_path)
    (tmp_path / "desired.json").write_text("{not json")
    journal.create("m", "v1", "v2", [100], 0.0)
    pub.publish()
    assert desired.read(tmp_path / "desired.json")["m"].active == "v1"


def _reconciler(fleet: FakeFleet, pub: DesiredPublisher, ex: Executor) -> Reconciler:
    return Reconciler(fleet, lambda: pub.models, ex.lock, ControllerMetrics(), 0.01)


def test_reconcile_repairs_a_restarted_shard_and_ranker(tmp_path: Path) -> None:
    fleet, journal, ex, pub = _harness(tmp_path)
    r = journal.create("m", "v1", "v2", [100], 0.0)
    assert asyncio.run(ex.run(r.id)).status == "succeeded"
    rec = _reconciler(fleet, pub, ex)
    clean = asyncio.run(rec.run_once())
    assert clean.drift == [] and clean.repairs == [] and clean.errors == []
    # A replica and a ranker restarted with their command line (v1): the finding.
    fleet.shards["shard-1-0:50051"] = {"v1": fleet._shard_version("v1")}
    fleet.rankers["http://ranker-0"] = _Ranker("m", {"v1": "active"}, {"v1": 1.0}, "v1")
    p = asyncio.run(rec.run_once())
    assert "shard shard-1-0:50051 lacks m/v2" in p.drift
    assert p.errors == []
    assert fleet.shards["shard-1-0:50051"]["v2"].state == "ready"
    ranker = fleet.rankers["http://ranker-0"]
    assert ranker.split == {"v2": 1.0} and ranker.active == "v2"
    assert fleet.violations == []
    counts = {s.labels["kind"]: s.value for m in rec.metrics.registry.collect()
              if m.name == "deploy_controller_reconcile_repairs" for s in m.samples
              if s.name.endswith("_total")}
    assert counts == {"shard_load": 1, "ranker_load": 1, "ranker_prepare": 1, "ranker_split": 1}
    again = asyncio.run(rec.run_once())
    assert again.drift == [] and again.repairs == []
    assert rec.view() is not None and rec.view()["passes"] == 3  # type: ignore[index]


def test_reconcile_skips_a_model_while_a_step_acts_on_it(tmp_path: Path) -> None:
    fleet, journal, ex, pub = _harness(tmp_path)
    r = journal.create("m", "v1", "v2", [100], 0.0)
    assert asyncio.run(ex.run(r.id)).status == "succeeded"
    fleet.shards["shard-0-0:50051"] = {}
    rec = _reconciler(fleet, pub, ex)

    async def during_step() -> list[str]:
        async with ex.lock("m"):
            return (await rec.run_once()).skipped

    assert asyncio.run(during_step()) == ["m"]
    assert fleet.shards["shard-0-0:50051"] == {}


def test_reconcile_reports_a_refused_load_as_an_error(tmp_path: Path) -> None:
    fleet, journal, ex, pub = _harness(tmp_path)
    r = journal.create("m", "v1", "v2", [100], 0.0)
    assert asyncio.run(ex.run(r.id)).status == "succeeded"
    fleet.shards["shard-0-0:50051"] = {}
    fleet.fail_load.add(("shard-0-0:50051", "v2"))
    p = asyncio.run(_reconciler(fleet, pub, ex).run_once())
    assert p.errors and "shard-0-0:50051" in p.errors[0]


# ---------------------------------------------------------------- servers' startup


def _write(path: Path, model: str, active: str, versions: tuple[str, ...],
           split: dict[str, float]) -> None:
    desired.write(path, {model: DesiredModel(active, versions, split, {}, "r-1", 1.0, 7)})


def test_embedding_server_loads_the_desired_versions_instead_of_preload(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "ads_ctr").mkdir(parents=True)
    path = tmp_path / "desired.json"
    assert read_desired(path) == {}  # missing: nothing desired yet
    _write(path, "ads_ctr", "v2", ("v2", "v1"), {"v2": 0.5, "v1": 0.5})
    _write_other = desired.read(path) | {"other": DesiredModel("x", ("x",), {"x": 1.0})}
    desired.write(path, _write_other)
    got = startup_versions(store, (("ads_ctr", "v1"), ("ads_ctr", "v0")), read_desired(path))
    assert got == [("ads_ctr", "v2", ""), ("ads_ctr", "v1", "")]  # no v0, no foreign model
    got = startup_versions(store, (("ads_ctr", "v1"),), {})
    assert got == [("ads_ctr", "v1", "")]
    path.write_text('{"format": "hybrid-serving/desired-state/v1", "models": {"a": 3}}')
    assert read_desired(path) == {}  # unreadable: logged, --preload


@pytest.mark.parametrize("doc", [
    {"format": "other", "models": {}},
    {"format": desired.FORMAT, "models": {"m": {"active": "v9", "versions": ["v1"],
                                                "split": {"v1": 1.0}}}},
    {"format": desired.FORMAT, "models": {"m": {"active": "v1", "versions": ["v1"],
                                                "split": {"v1": 0.5}}}},
    {"format": desired.FORMAT, "models": {"../x": {"active": "v1", "versions": ["v1"],
                                                   "split": {"v1": 1.0}}}},
    {"format": desired.FORMAT, "models": {"m": {"active": "v1", "versions": ["v1"],
                                                "split": {"v1": float("nan")}}}},
])
def test_malformed_desired_state_is_refused(doc: object) -> None:
    with pytest.raises(DesiredStateError):
        desired.parse(doc)


def test_ranker_startup_plan_follows_the_desired_state(tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    cfg = RankerConfig(store=tmp_path, model="ads_ctr", version="v1", desired_state=path)
    assert startup_plan(cfg).split == {"v1": 1.0}  # no file yet
    _write(path, "ads_ctr", "v2", ("v2", "v1"), {"v2": 0.75, "v1": 0.25})
    p = startup_plan(cfg)
    assert p.versions == ("v2", "v1") and p.split == {"v2": 0.75, "v1": 0.25}
    _write(path, "other", "v3", ("v3",), {"v3": 1.0})
    assert startup_plan(cfg).versions == ("v1",)


# ---------------------------------------------------------------- deployctl arguments


@pytest.mark.parametrize("argv, needle", [
    (["rollout", "m", "v2", "--bake", "nan"], "'nan'"),
    (["rollout", "m", "v2", "--bake", "inf"], "'inf'"),
    (["rollout", "m", "v2", "--bake", "-1"], "'-1'"),
    (["rollback", "m", "--bake", "NaN"], "'NaN'"),
    (["rollout", "m", "v2", "--canary", "10,,100"], "'10,,100'"),
    (["rollout", "m", "v2", "--canary", "10,100,"], "'10,100,'"),
])
def test_deployctl_refuses_bad_numbers_as_usage_errors(
        argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--controller", "http://127.0.0.1:9"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# ---------------------------------------------------------------- Kubernetes mirror


class _Api:
    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.bodies: list[tuple[str, str, Any]] = []

    def patch_namespaced_config_map(self, name: str, namespace: str, body: Any,
                                    **kwargs: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("HTTP 403: forbidden")
        self.bodies.append((name, namespace, body))


def test_desired_state_is_mirrored_into_the_configmap_and_retried(
        tmp_path: Path, controller_config: MakeConfig) -> None:
    cfg = controller_config(discovery="kubernetes", k8s_namespace="prod",
                            k8s_desired_configmap="hybrid-serving-desired-state")
    api = _Api(fail=1)
    journal = Journal(tmp_path / "j.sqlite")
    pub = DesiredPublisher(journal, tmp_path / "desired.json", None, DesiredConfigMap(cfg, api))
    journal.create("m", "v1", "v2", [100], 0.0)
    pub.publish()
    assert pub.error is not None and "403" in pub.error and api.bodies == []
    pub.publish()  # nothing changed, but the last write failed: written again
    assert pub.error is None
    ((name, ns, body),) = api.bodies
    assert (name, ns) == ("hybrid-serving-desired-state", "prod")
    assert desired.parse(json.loads(body["data"][DESIRED_KEY]))["m"].active == "v1"
    assert body["data"][DESIRED_KEY] == (tmp_path / "desired.json").read_text()

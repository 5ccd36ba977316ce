"""The controller's operations, as the HTTP API and the CLI see them.

It checks a request against the fleet before anything is journaled (names, the
version in the store, one agreed active version, memory fit), chooses the strategy
(bluegreen.choose: in place when both versions fit every replica, blue/green when they do
not or when asked) and journals its plan with the rollout, starts one asyncio task
per running rollout, recovers interrupted rollouts at startup, and cancels running
tasks at shutdown (a cancelled step is simply an interrupted one: the next start
resumes or rolls it back, see recovery.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from deploy_controller import bluegreen, steps
from deploy_controller.bluegreen import Plan, StrategyRefused
from deploy_controller.config import ControllerConfig
from deploy_controller.deltas import DeltaStreams
from deploy_controller.desired import DesiredPublisher
from deploy_controller.errors import ControllerError
from deploy_controller.executor import Executor
from deploy_controller.fleet import Fleet
from deploy_controller.journal import Journal, ModelBusyError, Rollout
from deploy_controller.metrics import ControllerMetrics
from deploy_controller.reconcile import Reconciler
from deploy_controller.recovery import recover
from deploy_controller.state import Phase, Status, Strategy, abortable, validate_canary
from deploy_controller.steps import Ctx, StepFailed
from deploy_controller.tasks import Tasks
from modelpack.schema import SchemaError, check_name

log = logging.getLogger(__name__)


def _configmap(cfg: ControllerConfig) -> Callable[[str], None] | None:
    if cfg.discovery != "kubernetes" or not cfg.k8s_desired_configmap:
        return None
    from deploy_controller.kube import DesiredConfigMap  # the kubernetes client, only here

    return DesiredConfigMap(cfg)


class Controller:
    def __init__(self, cfg: ControllerConfig, journal: Journal, fleet: Fleet,
                 metrics: ControllerMetrics | None = None, executor: Executor | None = None
                 ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.fleet = fleet
        self.metrics = metrics or ControllerMetrics()
        self.publisher = DesiredPublisher(journal, cfg.desired_state_path(), cfg.store,
                                          _configmap(cfg))
        self.executor = executor or Executor(journal, fleet, cfg, self.metrics,
                                             publisher=self.publisher)
        self.deltas = DeltaStreams(cfg, journal, fleet, self.metrics, self.executor.lock,
                                   self._serving, lambda: self.publisher.models,
                                   self.publisher.publish, self.executor.crash)
        self.reconciler = Reconciler(fleet, lambda: self.publisher.models, self.executor.lock,
                                     self.metrics, cfg.reconcile_interval_s,
                                     refresh=self.publisher.publish,
                                     replicas=self.publisher.replicas.get)
        self._tasks: Tasks[Rollout] = Tasks("rollout")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Recover whatever a previous process left running, run it on, publish the
        desired state the journal implies and start reconciling the fleet to it."""
        resumed = recover(self.journal, time.time(), self.cfg.max_unsupervised_s,
                          self.metrics)
        self.publisher.publish()
        for rid, _ in resumed:
            self._spawn(rid)
        self.deltas.start()
        self.reconciler.start()

    async def stop(self) -> None:
        await self.reconciler.stop()
        await self.deltas.stop()
        await self._tasks.cancel()

    async def wait(self, rollout_id: str) -> Rollout:
        """Until the rollout's task ends (tests and the CLI's in-process uses)."""
        await self._tasks.wait(rollout_id)
        got = self.journal.get(rollout_id)
        if got is None:
            raise ControllerError(404, f"no rollout {rollout_id}")
        return got

    def _spawn(self, rollout_id: str) -> None:
        self._tasks.spawn(rollout_id, self.executor.run(rollout_id))

    # ------------------------------------------------------------------ operations

    async def create(self, model: str, version: str, canary: Sequence[int] | None = None,
                     bake_s: float | None = None, strategy: str | None = None) -> Rollout:
        shares, bake, old, plan = await self._request(model, version, canary, bake_s, strategy)
        if not plan.ok:
            raise ControllerError(409, f"refused by the blue/green capacity rule: {plan.verdict}")
        try:
            r = self.journal.create(model, old, version, shares, bake, plan.strategy,
                                    plan.to_json())
        except ModelBusyError as e:
            raise ControllerError(409, str(e)) from None
        log.info("rollout %s: %s %s -> %s, canary %s, bake %.0f s, %s: %s", r.id, model, old,
                 version, shares, bake, plan.strategy, plan.why)
        self._spawn(r.id)
        return r

    async def plan(self, model: str, version: str, canary: Sequence[int] | None = None,
                   strategy: str | None = None) -> dict[str, Any]:
        """What `create` would do, without doing it: the strategy, why, the ordered steps,
        what every replica holds after each, the capacity rule's verdict."""
        shares, _, old, plan = await self._request(model, version, canary, 0.0, strategy)
        return {"model": model, "from_version": old, "to_version": version, "canary": shares,
                **plan.to_json()}

    async def _request(self, model: str, version: str, canary: Sequence[int] | None,
                       bake_s: float | None, strategy: str | None
                       ) -> tuple[list[int], float, str, Plan]:
        """The checks every rollout request passes before anything is journaled."""
        want = (strategy or self.cfg.default_strategy).replace("-", "_")
        if want not in ("auto", *Strategy):
            raise ControllerError(422, f"strategy must be auto, in-place or blue-green, got "
                                  f"{strategy!r}")
        try:
            check_name("model", model)
            check_name("version", version)
            shares = validate_canary(canary if canary is not None else self.cfg.default_canary)
        except (SchemaError, ValueError) as e:
            raise ControllerError(422, str(e)) from None
        bake = self.cfg.default_bake_s if bake_s is None else float(bake_s)
        if not 0 <= bake <= 86400:
            raise ControllerError(422, f"bake_s must be in [0, 86400], got {bake}")
        if self.cfg.store is not None and not (self.cfg.store / model / version
                                               / "manifest.json").is_file():
            raise ControllerError(404, f"no version {model}/{version} in store {self.cfg.store}")
        for r in self.journal.active(model):
            raise ControllerError(409, f"model {model!r} already has an active rollout {r.id} "
                                  f"({r.from_version} -> {r.to_version}, {r.step.name})")
        for op in self.deltas.dj.running(model):
            raise ControllerError(409, f"model {model!r} has a delta {op.kind} to seq "
                                  f"{op.to_seq} running ({op.id}); retry when it ends")
        old = await self._active_version(model)
        if old == version:
            raise ControllerError(409, f"{model}/{version} is already the active version")
        return shares, bake, old, await self._plan(model, old, version, shares, want)

    def _ctx(self, model: str, old: str = "", new: str = "") -> Ctx:
        return Ctx(self.fleet, self.cfg, model, old, new, [100])

    async def _serving(self, model: str) -> str:
        """The version a model serves alone: the desired state's, else the rankers'."""
        want = self.publisher.models.get(model)
        return want.active if want is not None else await self._active_version(model)

    async def _active_version(self, model: str) -> str:
        """The one version every ranker of the model serves alone, else 409."""
        try:
            statuses = await steps.discover(self._ctx(model))
        except StepFailed as e:
            status = 503 if e.code == "ranker_unreachable" else 409
            raise ControllerError(status, f"cannot start a rollout: {e.message}") from None
        actives = {u: (st.active, tuple(sorted(v for v, s in st.split.items() if s > 0)))
                   for u, st in statuses.items()}
        seen = set(actives.values())
        if len(seen) != 1:
            raise ControllerError(409, "rankers disagree on what they serve: " + ", ".join(
                f"{u}: active {a}, traffic on {list(t)}" for u, (a, t) in actives.items()))
        active, traffic = seen.pop()
        if active is None or traffic != (active,):
            raise ControllerError(409, f"rankers of {model} are not serving one version alone "
                                  f"(active {active}, traffic on {list(traffic)}); "
                                  "finish or roll back that first")
        return active

    async def _plan(self, model: str, old: str, new: str, shares: list[int], want: str) -> Plan:
        ctx = self._ctx(model, old, new)
        try:
            beside, alone = await steps.fit_report(ctx)
            chosen, why = bluegreen.choose(want, ctx.topology.shards, beside, alone)
        except StepFailed as e:
            raise ControllerError(409, f"refused: {e.message}") from None
        except StrategyRefused as e:
            raise ControllerError(e.status, f"refused: {e.message}") from None
        if chosen is Strategy.IN_PLACE:
            return bluegreen.in_place(ctx.topology.shards, shares, old, new, why)
        return bluegreen.blue_green(ctx.topology.shards, shares, old, new,
                                    self.cfg.bluegreen_max_load, why)

    def get(self, rollout_id: str) -> dict[str, Any]:
        r = self.journal.get(rollout_id)
        if r is None:
            raise ControllerError(404, f"no rollout {rollout_id}")
        return {**r.to_json(), **self.executor.progress(rollout_id),
                **self.convergence(r.model)}

    def convergence(self, model: str) -> dict[str, Any]:
        """The model's desired state and the last reconcile pass (for `deployctl status`)."""
        want = self.publisher.models.get(model)
        return {"desired": want.to_json() if want is not None else None,
                "desired_error": self.publisher.error, "reconcile": self.reconciler.view()}

    def abort(self, rollout_id: str, reason: str = "") -> Rollout:
        r = self.journal.get(rollout_id, events=False)
        if r is None:
            raise ControllerError(404, f"no rollout {rollout_id}")
        if not r.active:
            raise ControllerError(409, f"rollout {rollout_id} already ended ({r.status})")
        if r.status is Status.ROLLING_BACK:
            return r  # already going back: nothing more to do
        if r.step.phase is Phase.RETIRE or not abortable(r.step):
            raise ControllerError(409, f"rollout {rollout_id} is retiring {r.from_version}: "
                                  f"too late to abort; once it ends, `rollback {r.model}` "
                                  f"rolls back to {r.from_version}")
        self.journal.request_abort(rollout_id, reason or "operator")
        self.executor.signal_abort(rollout_id, reason)
        log.warning("rollout %s: abort requested (%s)", rollout_id, reason or "no reason given")
        got = self.journal.get(rollout_id, events=False)
        assert got is not None
        return got

    async def rollback(self, model: str, reason: str = "",
                       bake_s: float | None = None) -> Rollout:
        """Abort the model's active rollout, or roll the fleet back to the version before."""
        try:
            check_name("model", model)
        except SchemaError as e:
            raise ControllerError(422, str(e)) from None
        for r in self.journal.active(model):
            return self.abort(r.id, reason or "rollback requested")
        done = [r for r in self.journal.history(model, limit=1000)
                if r.status is Status.SUCCEEDED]
        if not done:
            raise ControllerError(409, f"no completed rollout of {model} to roll back")
        last = done[0]
        return await self.create(model, last.from_version, [100],
                                 0.0 if bake_s is None else bake_s)

    def history(self, model: str | None = None, limit: int = 50) -> list[Rollout]:
        return self.journal.history(model, limit)

    def running(self) -> list[str]:
        return self._tasks.keys()

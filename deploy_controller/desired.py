"""The desired state the journal implies, and its publication (modelpack/desired.py).

`target(rollout)` maps a rollout's current step to what every server must hold and
serve. A version joins `versions` only once every shard replica has loaded it (from
PREPARE on), so a corrupt or oversized version is never pushed onto restarted servers;
the split is the one the last finished SHIFT set. Retire and rollback drop the version
going away at once: a server that restarts then need not load it again.

A blue/green rollout (bluegreen.py) follows the same rules over its own path: `versions`
is what the rankers hold; a restarted shard replica loads the first of them that fits
(the active one), and `replica_holds(r)` says what the plan wants on each replica at the
current step, for the reconcile loop to convert a replica that came back with the other
version. (The file itself has no per-replica field yet; see the README.)

`deltas` is each model's committed delta seq (delta_journal.py) for the version its
stream follows, while that version is among `versions` (a model with a stream and no
rollout yet is published as serving the stream's version alone).

`DesiredPublisher.publish()` recomputes every model that has a rollout or a delta stream
in the journal and rewrites the file (and, on Kubernetes, the ConfigMap the pods mount) when something
changed or the last write failed; the reconcile loop calls it every pass, so a failed
write is retried within seconds. Models the journal has never seen keep
whatever the file says (a controller started on a fresh journal does not erase them),
so the file, not the journal, is what servers trust.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from deploy_controller.delta_journal import DeltaJournal
from deploy_controller.journal import Journal, Rollout
from deploy_controller.state import Kind, Phase, Step
from modelpack import desired
from modelpack.desired import DesiredModel, DesiredStateError
from modelpack.manifest import read_manifest

log = logging.getLogger(__name__)


def _split(r: Rollout, index: int) -> dict[str, float]:
    """The split after SHIFT(index) (index -1: before the first shift)."""
    if index < 0:
        return {r.from_version: 1.0}
    share = r.canary[index] / 100.0
    if share >= 1.0:
        return {r.to_version: 1.0}
    return {r.from_version: round(1.0 - share, 6), r.to_version: round(share, 6)}


def _failed_from(r: Rollout) -> Phase:
    """The phase of the step whose failure ended the rollout FAILED."""
    for e in reversed(r.events):
        if e.event == "end":
            return Step.parse(e.step).phase
    return Phase.RETIRE


def target(r: Rollout) -> tuple[str, tuple[str, ...], dict[str, float]]:
    """(active, versions, split) for the fleet while `r` stands at its current step."""
    old, new, step = r.from_version, r.to_version, r.step
    k = step.kind
    if k is Kind.CONVERT:  # between the canary steps: as the step before it in the path
        before = r.path[:r.path.index(step.name)] if step.name in r.path else ()
        if Kind.PREPARE not in before:
            return old, (old,), {old: 1.0}
        shifts = [Step.parse(n).index for n in before if n.startswith(f"{Kind.SHIFT}:")]
        split = _split(r, shifts[-1] if shifts else -1)
        active = max(split, key=lambda v: (split[v], v == old))
        return active, (active, *(v for v in (old, new) if v != active)), split
    if k is Kind.CONVERT_REST:
        return new, (new,), {new: 1.0}
    if k is Kind.REVERT_REPLICAS:
        return old, (old,), {old: 1.0}
    if k in (Kind.LOAD_DENSE, Kind.CHECK_FIT, Kind.LOAD_EMBEDDINGS, Kind.CHECK_PLAN):
        return old, (old,), {old: 1.0}
    if k is Kind.PREPARE:
        return old, (old, new), {old: 1.0}
    if k in (Kind.SHIFT, Kind.BAKE):
        split = _split(r, step.index - 1 if k is Kind.SHIFT else step.index)
        active = max(split, key=lambda v: (split[v], v == old))
        return active, (active, *(v for v in (old, new) if v != active)), split
    if k in (Kind.UNLOAD_OLD_RANKERS, Kind.UNLOAD_OLD_SHARDS, Kind.SUCCEEDED):
        return new, (new,), {new: 1.0}
    if k is Kind.ROLLBACK_TRAFFIC:
        return old, (old, new), {old: 1.0}
    if k in (Kind.UNLOAD_NEW_RANKERS, Kind.UNLOAD_NEW_SHARDS, Kind.ROLLED_BACK):
        return old, (old,), {old: 1.0}
    # FAILED: retire failed with the new version serving everything; a rollback failed
    # with traffic moving back to the old one (the new one may still be loaded anywhere).
    if _failed_from(r) is Phase.RETIRE:
        return new, (new,), {new: 1.0}
    return old, (old, new), {old: 1.0}


def replica_holds(r: Rollout) -> dict[str, tuple[str, ...]] | None:
    """Blue/green: replica -> the versions the plan has it hold while `r` stands at its
    current step ({}: no prescription, e.g. rolling back); None: not blue/green."""
    if not r.path or not r.active:
        return None
    rows = r.plan.get("rows", [])
    if r.step.name not in r.path or not rows:
        return {}
    i = r.path.index(r.step.name)
    row = rows[i] if r.step.kind is Kind.BAKE else rows[max(i - 1, 0)]
    return {a: tuple(vs) for a, vs in row["holds"].items()}


class DesiredPublisher:
    """Keeps the desired-state file in step with the journal."""

    def __init__(self, journal: Journal, path: Path, store: Path | None,
                 mirror: Callable[[str], None] | None = None) -> None:
        self.journal = journal
        self.path = path
        self.store = store
        self.mirror = mirror  # also written there (kube.DesiredConfigMap); OSError = failed
        self.models: dict[str, DesiredModel] = {}  # what the journal implies, by model
        self.replicas: dict[str, dict[str, tuple[str, ...]]] = {}  # blue/green models only
        self.error: str | None = None

    def _fingerprint(self, model: str, version: str) -> str | None:
        if self.store is None:
            return None
        try:
            return read_manifest(self.store / model / version).fingerprint
        except Exception as e:  # a version missing from the store: publish without it
            log.warning("desired state: no fingerprint for %s/%s: %s", model, version, e)
            return None

    def _latest(self) -> dict[str, Rollout]:
        """Each model's active rollout, else its most recent one."""
        out: dict[str, Rollout] = {}
        for r in self.journal.history(None, limit=1000):
            if r.model not in out:
                out[r.model] = r
        for r in self.journal.active():
            out[r.model] = r
        return out

    def publish(self) -> dict[str, DesiredModel]:
        """Recompute from the journal; rewrite the file if anything changed. Never raises."""
        try:
            on_file = desired.read(self.path)
        except DesiredStateError as e:
            log.error("desired state %s unreadable (%s): rewriting it from the journal",
                      self.path, e)
            on_file = {}
        merged = dict(on_file)
        changed = False
        streams = {s.model: s for s in DeltaJournal(self.journal).streams()}
        targets: dict[str, tuple[str, tuple[str, ...], dict[str, float], str | None]] = {
            s.model: (s.version, (s.version,), {s.version: 1.0}, None)  # no rollout yet
            for s in streams.values()}
        for model, r in self._latest().items():
            if r.step.kind is Kind.FAILED:  # target() reads the events to see where it failed
                r = self.journal.get(r.id) or r
            targets[model] = (*target(r), r.id)
            holds = replica_holds(r)
            if holds is None:
                self.replicas.pop(model, None)
            else:
                self.replicas[model] = holds
        for model, (active, versions, split, rid) in sorted(targets.items()):
            prev = on_file.get(model)
            prints = {v: fp for v in versions
                      if (fp := self._fingerprint(model, v)) is not None}
            st = streams.get(model)
            deltas = ({st.version: st.committed_seq}
                      if st is not None and st.committed_seq and st.version in versions else {})
            want = DesiredModel(active, versions, split, prints, rid, time.time(),
                                (prev.seq if prev else 0) + 1, deltas)
            if want.same_target(prev) and prev is not None:
                want = prev
            else:
                merged[model] = want
                changed = True
                log.info("desired state of %s: active %s, versions %s, split %s, deltas %s "
                         "(rollout %s, seq %d)", model, active, list(versions), split, deltas,
                         rid, want.seq)
            self.models[model] = want
        if changed or self.error is not None:  # a failed write is retried on the next call
            try:
                desired.write(self.path, merged)
                if self.mirror is not None:
                    self.mirror(desired.dumps(merged))
                self.error = None
            except OSError as e:
                self.error = f"cannot write the desired state: {e}"
                log.error("%s", self.error)
        return dict(self.models)

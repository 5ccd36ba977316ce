"""The blue/green scenario: a fleet whose shard replicas hold one version each, rolled
v1 -> v2 by the controller's blue/green plan, with which replica held which version over
time (ListVersions of every replica, polled) and a picture of it.

For the demo (`--scenario blue-green`, wired in loadtest/stack/demo.py):

    cfg = bluegreen.stack_config(store, run_dir, controller_extra=..., ranker_extra=...)
    with LocalStack(cfg) as stack:                   # 2 shards x 2 replicas, budget for one
        ... start the load ...
        run = bluegreen.run_blue_green(stack, "v2", canary="50,100", bake_s=9.0)
    bluegreen.plot_replicas(run, out / "replicas.png")
    bluegreen.write_json(run, out / "bluegreen.json")

`run.exit_code` is deployctl's (0 succeeded, 1 rolled back, 2 refused); `run.plan` the
plan it printed first (`deployctl rollout --plan`), `run.samples` the timeline.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedding_server.table_store import plan_version
from loadtest.stack.local import LocalStack, StackConfig

MODEL = "ads_ctr"
POLL_S = 0.25
NONE = "-"  # a replica holding no version READY (converting, or down)


@dataclass(frozen=True)
class Sample:
    """What one replica held READY at one moment (unix seconds)."""

    t: float
    replica: str
    versions: tuple[str, ...]


@dataclass
class BlueGreenRun:
    """One blue/green rollout: what deployctl said, the journal's steps, the timeline."""

    replicas: list[list[str]]  # shard -> replica addresses
    started_at: float
    ended_at: float = 0.0
    exit_code: int | None = None
    plan: str = ""  # `deployctl rollout --plan`'s text
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, begin time)
    samples: list[Sample] = field(default_factory=list)


def one_version_budget(store: Path, num_shards: int = 2, model: str = MODEL,
                       versions: Sequence[str] = ("v1", "v2")) -> int:
    """Bytes of memory budget that hold the largest shard of one version, never two."""
    need = max(plan_version(store, model, v, k, num_shards).nbytes
               for v in versions for k in range(num_shards))
    return need * 3 // 2


def stack_config(store: Path, run_dir: Path, *, replicas: int = 2,
                 controller_extra: Sequence[str] = (), ranker_extra: Sequence[str] = ()
                 ) -> StackConfig:
    """2 shards x `replicas` whose budget fits one version; rankers that prepare with one
    replica per shard (--prepare-min-replicas 1) and route lookups by version."""
    budget = one_version_budget(store)
    return StackConfig(store=store, run_dir=run_dir, replicas=(replicas, replicas),
                       shard_extra=("--drain-timeout", "10", "--memory-budget", str(budget)),
                       ranker_extra=("--prepare-min-replicas", "1", *ranker_extra),
                       controller_extra=tuple(controller_extra))


def _list_versions(addr: str, model: str) -> tuple[str, ...]:
    import grpc

    from protos import embedding_pb2 as pb
    from protos import embedding_pb2_grpc as pbg

    with grpc.insecure_channel(addr) as ch:
        resp = pbg.EmbeddingServiceStub(ch).ListVersions(  # type: ignore[no-untyped-call]
            pb.ListVersionsRequest(model=model), timeout=2)
    return tuple(sorted(v.version for v in resp.versions
                        if v.state == pb.VersionState.Value("VERSION_STATE_READY")))


class Watcher:
    """Polls every replica's ListVersions every `poll_s` in a thread until stopped."""

    def __init__(self, replicas: Sequence[str], model: str = MODEL, poll_s: float = POLL_S
                 ) -> None:
        self.replicas, self.model, self.poll_s = list(replicas), model, poll_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bluegreen-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for addr in self.replicas:
                try:
                    held = _list_versions(addr, self.model)
                except Exception:  # a replica down or busy: it holds nothing we can use
                    held = ()
                self.samples.append(Sample(time.time(), addr, held))
            self._stop.wait(self.poll_s)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _steps(stack: LocalStack, since: float) -> list[tuple[str, float]]:
    from deploy_controller.journal import read_rollouts

    rollouts = [r for r in read_rollouts(stack.journal) if r.created_at >= since - 1]
    if not rollouts:
        return []
    return [(e.step, e.ts) for e in rollouts[-1].events if e.event == "begin"]


def run_blue_green(stack: LocalStack, version: str = "v2", *, canary: str = "50,100",
                   bake_s: float = 9.0, strategy: str = "blue-green",
                   poll_s: float = POLL_S) -> BlueGreenRun:
    """Print the plan, roll `version` out with `strategy` (deployctl, followed live) while
    polling every replica; returns the run (deployctl's exit code, steps, timeline)."""
    from deploy_controller import cli

    common = ["--controller", stack.controller_url, "--token-file", str(stack.token_file)]
    head = ["rollout", MODEL, version, "--canary", canary, "--strategy", strategy]
    out = io.StringIO()
    cli.main([*head, "--plan", *common], out)
    print(out.getvalue(), flush=True)
    addrs = [[p.address for p in reps] for reps in stack.shards]
    run = BlueGreenRun(addrs, time.time(), plan=out.getvalue())
    with Watcher([a for reps in addrs for a in reps], MODEL, poll_s) as w:
        time.sleep(2 * poll_s)  # the state before
        run.exit_code = cli.main([*head, "--bake", f"{bake_s:g}", "--poll", "2", *common])
        time.sleep(2 * poll_s)  # the state after
    run.ended_at, run.samples = time.time(), w.samples
    run.steps = _steps(stack, run.started_at)
    return run


def segments(run: BlueGreenRun) -> dict[str, list[tuple[float, float, str]]]:
    """replica -> [(start, end, what it held)] with consecutive equal samples merged;
    times in seconds since the run started."""
    out: dict[str, list[tuple[float, float, str]]] = {a: [] for reps in run.replicas
                                                      for a in reps}
    for s in sorted(run.samples, key=lambda s: s.t):
        held = "+".join(s.versions) or NONE
        t = s.t - run.started_at
        segs = out.setdefault(s.replica, [])
        if segs and segs[-1][2] == held:
            segs[-1] = (segs[-1][0], t, held)
        else:
            if segs:
                segs[-1] = (segs[-1][0], t, segs[-1][2])
            segs.append((t, t, held))
    return out


def write_json(run: BlueGreenRun, path: Path) -> Path:
    """The run as JSON (timeline merged into segments), written atomically."""
    doc: dict[str, Any] = {k: v for k, v in asdict(run).items() if k != "samples"}
    doc["segments"] = segments(run)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


COLORS = {"v1": "#4c72b0", "v2": "#55a868", NONE: "#bbbbbb"}


def plot_replicas(run: BlueGreenRun, path: Path | str, title: str = "") -> Path:
    """One row per replica, a bar per stretch of time colored by what it held READY, the
    rollout's steps as vertical lines; a PNG (Agg backend, matplotlib imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = segments(run)
    rows = [a for reps in run.replicas for a in reps]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.6 * len(rows)))
    for i, addr in enumerate(rows):
        for t0, t1, held in segs.get(addr, []):
            ax.broken_barh([(t0, max(t1 - t0, 0.05))], (i - 0.35, 0.7),
                           color=COLORS.get(held, "#dd8452"))
            if t1 - t0 > 1.5:
                ax.text((t0 + t1) / 2, i, held, ha="center", va="center", fontsize=8,
                        color="white")
    labels = [f"shard {k} replica {j} ({a})" for k, reps in enumerate(run.replicas)
              for j, a in enumerate(reps)]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    for step, ts in run.steps:
        x = ts - run.started_at
        ax.axvline(x, color="#999999", lw=0.6, ls="--")
        ax.text(x, -0.6, step, rotation=60, fontsize=7, ha="left", va="bottom")
    handles = [matplotlib.patches.Patch(color=c, label=v) for v, c in COLORS.items()]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_xlabel("seconds since the rollout started")
    ax.set_title(title or f"blue/green rollout: which replica held which version "
                 f"(deployctl exit {run.exit_code})", fontsize=10, pad=40)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

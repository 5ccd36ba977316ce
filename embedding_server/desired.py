"""Startup convergence: which versions an embedding server loads before it reports SERVING.

The fleet's desired state (modelpack/desired.py, `--desired-state FILE`) wins over
`--preload` for every model it names: a server restarted with its original command line
(`--preload ads_ctr/v1`) after a rollout to v2 loads v2, not v1, so the rankers never see
a shard without the version they serve. A preloaded version the desired state no longer
lists is skipped (it would only take memory the desired versions may need). Models the
desired state does not name keep their --preload. An unreadable file is logged and
ignored: the server then starts from --preload, as it did before there was a file.
Each desired version is then replayed to its committed delta seq (`deltas: {V: s}`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from modelpack import desired
from modelpack.desired import DesiredModel, DesiredStateError

log = logging.getLogger(__name__)


def read_desired(path: Path | None) -> dict[str, DesiredModel]:
    """The desired models, or {} (no file configured, none written yet, or unreadable)."""
    if path is None:
        return {}
    try:
        models = desired.read(path)
    except DesiredStateError as e:
        log.error("desired state ignored, starting from --preload: %s", e)
        return {}
    if not models and not path.exists():
        log.info("no desired state at %s yet: starting from --preload", path)
    return models


def startup_versions(store: Path, preload: tuple[tuple[str, str], ...],
                     wanted: dict[str, DesiredModel]) -> list[tuple[str, str, str]]:
    """(model, version, expected fingerprint or "") to load at startup, in order.

    Desired versions of models this store holds, active first; then --preload for models
    the desired state does not name.
    """
    out: list[tuple[str, str, str]] = []
    for model, want in sorted(wanted.items()):
        if not (store / model).is_dir():
            continue  # another model's fleet shares the file; not ours to serve
        out += [(model, v, want.fingerprints.get(v, "")) for v in want.versions]
        skipped = [v for m, v in preload if m == model and v not in want.versions]
        if skipped:
            log.info("desired state of %s: active %s, versions %s (rollout %s, seq %d); "
                     "--preload %s skipped", model, want.active, list(want.versions),
                     want.rollout, want.seq, skipped)
    out += [(m, v, "") for m, v in preload if not (m in wanted and (store / m).is_dir())]
    unique: dict[tuple[str, str], str] = {}
    for m, v, fp in out:
        unique.setdefault((m, v), fp)
    return [(m, v, fp) for (m, v), fp in unique.items()]


def committed_seq(wanted: dict[str, DesiredModel], model: str, version: str) -> int:
    """The delta seq the desired state committed for a version (0: none, or not desired):
    a restarted server replays deltas 1..seq before it reports SERVING."""
    want = wanted.get(model)
    return want.delta_seq(version) if want is not None else 0

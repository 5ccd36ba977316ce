"""The fleet's desired state: what every server of a model must hold and serve.

The deploy controller writes it (deploy_controller/desired.py) whenever the journal
moves a model to a new serving state; embedding servers and rankers read it at startup
(`--desired-state FILE`), so a restarted process converges to what the fleet serves
before it reports ready, even while the controller is down. It lives here because it is
a contract between the three services, like the manifest.

    {"format": "hybrid-serving/desired-state/v1",
     "models": {MODEL: {"active": V, "versions": [V, ...], "split": {V: share},
                        "fingerprints": {V: "sha256:..."}, "rollout": ID | null,
                        "updated_at": unix seconds, "seq": n, "deltas": {V: s}}}}

`versions` are the versions every shard replica and every ranker must hold (the active
one first); `split` is the traffic split the rankers serve (shares summing to 1).
`seq` numbers the document's revisions. `deltas` is each version's committed delta seq
(modelpack/delta.py): every shard replica must read V at that seq before it reports
ready, and the rankers read V at it; a version it does not name is at 0 (its own rows).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpack.schema import SchemaError, check_name

FORMAT = "hybrid-serving/desired-state/v1"


class DesiredStateError(ValueError):
    """A desired-state file that cannot be read or does not have the expected shape."""


@dataclass(frozen=True)
class DesiredModel:
    """One model's desired state."""

    active: str
    versions: tuple[str, ...]
    split: dict[str, float]
    fingerprints: dict[str, str] = field(default_factory=dict)
    rollout: str | None = None
    updated_at: float = 0.0
    seq: int = 0
    deltas: dict[str, int] = field(default_factory=dict)

    def delta_seq(self, version: str) -> int:
        """The committed delta seq of `version` (0: its own rows)."""
        return self.deltas.get(version, 0)

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active, "versions": list(self.versions), "split": self.split,
                "fingerprints": self.fingerprints, "rollout": self.rollout,
                "updated_at": self.updated_at, "seq": self.seq,
                "deltas": {v: s for v, s in self.deltas.items() if s}}

    def same_target(self, other: DesiredModel | None) -> bool:
        """Whether `other` asks the fleet for the same thing (ignoring seq and time)."""
        return other is not None and (self.active, self.versions, self.split, self.fingerprints,
                                      self.to_json()["deltas"]) == (
            other.active, other.versions, other.split, other.fingerprints, other.to_json()["deltas"])


def _delta_seq(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"a delta seq must be an integer >= 0, got {v!r}")
    return v


def _model(name: str, d: object) -> DesiredModel:
    if not isinstance(d, dict):
        raise DesiredStateError(f"model {name!r}: must be an object, got {type(d).__name__}")
    try:
        active = check_name("version", d.get("active"))
        versions = tuple(check_name("version", v) for v in d.get("versions") or [])
        split = {check_name("version", k): float(s) for k, s in (d.get("split") or {}).items()}
        prints = {check_name("version", k): str(v)
                  for k, v in (d.get("fingerprints") or {}).items()}
        deltas = {check_name("version", k): _delta_seq(v) for k, v in (d.get("deltas") or {}).items()}
    except (SchemaError, TypeError, ValueError, AttributeError) as e:
        raise DesiredStateError(f"model {name!r}: {e}") from None
    if not set(deltas) <= set(versions):
        raise DesiredStateError(f"model {name!r}: deltas {deltas} name versions not in "
                                f"{list(versions)}")
    if active not in versions:
        raise DesiredStateError(f"model {name!r}: active {active!r} is not in versions "
                                f"{list(versions)}")
    if not split or any(not math.isfinite(s) or s < 0 for s in split.values()) or abs(
            math.fsum(split.values()) - 1.0) > 1e-6 or not set(split) <= set(versions):
        raise DesiredStateError(f"model {name!r}: split {split} must be shares >= 0 of "
                                f"listed versions summing to 1")
    rollout = d.get("rollout")
    return DesiredModel(active, versions, split, prints,
                        None if rollout is None else str(rollout),
                        float(d.get("updated_at") or 0.0), int(d.get("seq") or 0), deltas)


def parse(raw: object) -> dict[str, DesiredModel]:
    """A decoded desired-state document -> {model: DesiredModel}; DesiredStateError if bad."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DesiredStateError(f"not a desired-state document (format must be {FORMAT!r})")
    models = raw.get("models")
    if not isinstance(models, dict):
        raise DesiredStateError("'models' must be an object")
    out = {}
    for name, d in models.items():
        try:
            check_name("model", name)
        except SchemaError as e:
            raise DesiredStateError(str(e)) from None
        out[name] = _model(name, d)
    return out


def read(path: Path) -> dict[str, DesiredModel]:
    """The file's models; {} when it does not exist (nothing desired yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DesiredStateError(f"{path}: {e.strerror or e}") from None
    try:
        return parse(json.loads(text))
    except ValueError as e:  # JSONDecodeError included
        raise DesiredStateError(f"{path}: {e}") from None


def dumps(models: dict[str, DesiredModel]) -> str:
    return json.dumps({"format": FORMAT, "models": {m: d.to_json()
                                                    for m, d in sorted(models.items())}},
                      indent=2, sort_keys=True) + "\n"


def write(path: Path, models: dict[str, DesiredModel]) -> None:
    """Atomically: a temp file beside it, fsynced, renamed over it, the directory fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dumps(models))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # servers running as other users read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

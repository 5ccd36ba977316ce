"""Delta seqs on the ranker: the check before a version is read at a new seq.

The ranker reads no delta rows from remote shards; it names a seq in every lookup and the
shards read at it. So before naming a seq it checks that deltas 1..seq of the version
exist in its store and chain at the manifest level (modelpack.delta_read's manifest
checks: this build of this version, at its seq, dense frozen at it, each linked to the
one before). Delta manifests are immutable once written, so the checked ones are kept
per version (LoadedVersion.checked) and an advance by one reads one manifest.
"""

from __future__ import annotations

from pathlib import Path

from modelpack.delta import DeltaError, DeltaManifest
from modelpack.delta_read import load_delta_manifest
from modelpack.manifest import Manifest

MAX_SEQ = 10**12  # modelpack.delta's bound on a seq


def check_chain(vdir: Path, base: Manifest, seq: int, checked: dict[int, DeltaManifest]
                ) -> DeltaManifest | None:
    """Delta `seq`'s manifest once deltas 1..seq chain (None for seq 0); DeltaError naming
    the first delta that is missing or does not fit. Adds what it checked to `checked`."""
    prev = base.fingerprint
    m: DeltaManifest | None = None
    for k in range(1, seq + 1):
        m = checked.get(k)
        if m is None:
            m = load_delta_manifest(vdir, k, base)
            if m.prev_fingerprint != prev:
                before = f"delta {k - 1}'s" if k > 1 else f"{base.version}'s own"
                raise DeltaError(f"{m.name}: follows {m.prev_fingerprint}, but {before} "
                                 f"fingerprint is {prev} (out of order or another chain)")
            checked[k] = m
        prev = m.fingerprint
    return m

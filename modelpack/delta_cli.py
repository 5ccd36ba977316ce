"""`python -m modelpack delta {verify,list,compact}` and `delta-train`: a version's deltas."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modelpack.configcli import ConfigFlags
from modelpack.delta import TMP_PREFIX, DeltaError, deltas_dir
from modelpack.delta_read import good_prefix, list_seqs, load_delta_manifest, verify_chain
from modelpack.delta_train_size import DeltaTrainSize
from modelpack.manifest import VerifyError, read_manifest
from modelpack.schema import SchemaError

_TRAIN_FLAGS = ConfigFlags(DeltaTrainSize)


def _seq_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_parser(sub: Any) -> None:
    """Register `delta` and its subcommands on the top-level subparsers."""
    d = sub.add_parser("delta", help="versioned delta updates of a version's tables")
    dsub = d.add_subparsers(dest="delta_cmd", required=True)
    v = dsub.add_parser("verify", help="verify the delta chain (manifests, hash chain, bytes, rows)")
    v.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    v.add_argument("--upto", type=_seq_arg, default=None, help="last seq to verify (default: all)")
    ls = dsub.add_parser("list", help="list the deltas of a version (manifests only, no hashing)")
    ls.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    ls.add_argument("--json", action="store_true", help="one JSON object per delta")
    c = dsub.add_parser("compact", help="fold V + deltas 1..SEQ into a new full version")
    c.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    c.add_argument("--upto", type=_seq_arg, required=True, help="last seq to fold in")
    c.add_argument("--to", required=True, help="name of the new version (e.g. v1c3)")
    t = sub.add_parser("delta-train", help="demo: train a version's tables further on a newer "
                       "synthetic day, dense frozen, writing a delta every N examples")
    t.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    _TRAIN_FLAGS.add_to(t)
    t.add_argument("--eval", type=Path, default=None,
                   help="labelled requests (eval.jsonl) to score before and after: served AUC")


def _list(path: Path, as_json: bool) -> int:
    base = read_manifest(path)
    status = 0
    for seq in list_seqs(path):
        try:
            m = load_delta_manifest(path, seq, base)
        except DeltaError as e:
            print(f"{seq}\tREFUSED\t{e}")
            status = 1
            continue
        tables = {t.name: t.rows for t in m.tables}
        if as_json:
            print(json.dumps({"seq": seq, "fingerprint": m.fingerprint, "rows": tables,
                              "written_at": m.written_at, "provenance": m.provenance}))
        else:
            print(f"{seq}\t{m.fingerprint}\t{m.num_rows} rows\t{tables}")
    d = deltas_dir(path)
    stale = sorted(p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)) if d.is_dir() else []
    for name in stale:
        print(f"# unfinished write (ignored): {d / name}", file=sys.stderr)
    return status


def _train(args: argparse.Namespace) -> int:
    from modelpack.delta_train import delta_train, served_auc  # imports torch

    size = DeltaTrainSize(**_TRAIN_FLAGS.values(args))
    base = read_manifest(args.path)
    reqs = []
    if args.eval is not None:
        reqs = [json.loads(line) for line in args.eval.read_text().splitlines() if line.strip()]
    before = served_auc(args.path, base, reqs, None) if reqs else 0.0
    ms = delta_train(args.path, size, progress=True)
    for m in ms:
        print(f"{m.seq}\t{m.fingerprint}\t{m.num_rows} rows\t{m.provenance}")
    if reqs:
        seqs = f"{ms[0].seq - 1} -> {ms[-1].seq}"
        after = served_auc(args.path, base, reqs, None)
        print(f"served AUC on {args.eval} at seq {seqs}: {before:.4f} -> {after:.4f} "
              f"({after - before:+.4f})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed `delta`/`delta-train` subcommand; errors: one line on stderr, status 1."""
    try:
        if args.cmd == "delta-train":
            return _train(args)
        if args.delta_cmd == "verify":
            if args.upto is None:  # the whole chain: say where a stream would pause
                ms, err = good_prefix(args.path)
                if err is not None:
                    last = f"seq {ms[-1].seq} ({ms[-1].fingerprint})" if ms else "seq 0 (the version)"
                    print(f"error: {err}\nlast good: {last}", file=sys.stderr)
                    return 1
            else:
                ms = verify_chain(args.path, args.upto)
            last = f"{ms[-1].fingerprint} at seq {ms[-1].seq}" if ms else "no deltas"
            print(f"OK {args.path}: {len(ms)} deltas verified, {sum(m.num_rows for m in ms)} rows, "
                  f"{last}")
            return 0
        if args.delta_cmd == "list":
            return _list(args.path, args.json)
        from modelpack.delta_compact import compact  # imports torch: only when compacting

        m = compact(args.path, args.upto, args.to)
        print(f"OK {m.model}/{m.version} {m.fingerprint} = {args.path.name} + deltas 1..{args.upto}")
        return 0
    except (DeltaError, VerifyError, SchemaError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

"""`python -m modelpack {demo,verify,inspect,delta,delta-train}`: build the demo store, check or
show a version, verify, list or compact its deltas, train the demo's deltas."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from modelpack import delta_cli
from modelpack.manifest import VerifyError, read_manifest, verify
from modelpack.schema import SchemaError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modelpack", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train and export the demo model ads_ctr v1 and v2")
    d.add_argument("--store", type=Path, required=True, help="model store directory")
    d.add_argument("--rows", type=int, default=200_000, help="rows of the unified table")
    d.add_argument("--examples", type=int, default=2_000_000,
                   help="training examples per version (requests x 16 candidates)")
    d.add_argument("--eval-requests", type=int, default=4_000,
                   help="held-out requests per version")
    d.add_argument("--shards", type=int, default=2, help="shard files per table")
    d.add_argument("--force", action="store_true", help="rebuild versions that already exist")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    v = sub.add_parser("verify", help="re-hash every file of a version against its manifest")
    v.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    i = sub.add_parser("inspect", help="print a version's manifest")
    i.add_argument("path", type=Path, help="version directory STORE/MODEL/VERSION")
    delta_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.cmd == "demo":
        from modelpack.demo import DemoSize, build_demo_store, describe, load_results
        from modelpack.synth import MODEL_NAME

        existing = load_results(args.store, MODEL_NAME)
        if existing is not None and not args.force:
            print("demo store already built (use --force to rebuild)")
            print(describe(args.store, existing))
            return 0
        size = DemoSize(rows=args.rows, requests=max(1, args.examples // 16),
                        eval_requests=args.eval_requests, num_shards=args.shards)
        results = build_demo_store(args.store, size, progress=not args.quiet, overwrite=args.force)
        print(describe(args.store, results))
        return 0
    if args.cmd in ("delta", "delta-train"):
        return delta_cli.run(args)
    try:
        if args.cmd == "verify":
            m = verify(args.path)
            print(f"OK {m.model}/{m.version} {m.fingerprint} ({len(m.files)} files verified)")
        else:
            m = read_manifest(args.path)
            print(json.dumps({**m.body(), "fingerprint": m.fingerprint}, indent=2))
    except (VerifyError, SchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

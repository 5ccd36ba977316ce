"""`python -m loadtest.stack up|down|status`: the local fleet, detached, for a person to try.

    python -m loadtest.stack up   [--store demo_store] [--run-dir build/stack]  # detached; prints curl
    . build/stack/env                                                           # its URLs and token
    python -m loadtest.stack down [--run-dir build/stack]                       # SIGTERM, then SIGKILL
    python -m loadtest.stack status [--run-dir build/stack]

`up` builds the demo store if needed, starts the fleet (loadtest/stack/local.py) on the
fixed ports 50051.., 8080, 8090 where they are free, records it in RUN_DIR/stack.json
and exits; `down` stops what that record names (loadtest/stack/state.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.stack.local import LocalStack, StackConfig, StackError, ensure_store
from loadtest.stack.state import ENV_FILE, STATE_FILE, down, env_text, read_state, still_running


def usage_text(state: dict[str, Any], eval_file: Path, env_file: Path) -> str:
    """What a person can do with a running stack, as commands that work when pasted."""
    lines = [
        f"ranker      {state['ranker_url']}   (/v1/rank, /readyz, /metrics)",
        f"controller  {state['controller_url']}   (deployctl)",
        f"logs        {state['run_dir']}/*.log",
        "",
        f"  . {env_file}    # RANKER_URL, DEPLOYCTL_CONTROLLER, DEPLOYCTL_TOKEN, SHARD0..",
        f"  head -1 {eval_file} | curl -s -H 'content-type: application/json' "
        "--data-binary @- \"$RANKER_URL/v1/rank\"",
        "  .venv/bin/deployctl rollout ads_ctr v2 --canary 10,50,100 --bake 10",
        "  .venv/bin/locust -f loadtest/locust/locustfile.py --headless -u 8 -r 8 --run-time 30s "
        f"--host \"$RANKER_URL\" --eval {eval_file}",
        "  make down",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m loadtest.stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--store", type=Path, default=Path("demo_store"), help="model store")
    p.add_argument("--run-dir", type=Path, default=Path("build/stack"),
                   help="logs, pids (stack.json), fleet file, journal")
    p.add_argument("--version", default="v1", help="version served at startup")
    p.add_argument("--free-ports", action="store_true",
                   help="let every server pick a free port instead of 50051.., 8080, 8090")
    args = p.parse_args(argv)
    if args.command == "down":
        down(args.run_dir)
        return 0
    existing = read_state(args.run_dir)
    if args.command == "status":
        if existing is None:
            print(f"no stack running from {args.run_dir}")
            return 1
        for proc in existing["processes"]:
            up = still_running(proc)
            print(f"{proc['name']:<12} pid {proc['pid']:<8} {proc['address']:<22} "
                  f"{'running' if up else 'GONE'}")
        return 0
    eval_file = args.store / "ads_ctr" / args.version / "eval.jsonl"
    env_file = args.run_dir / ENV_FILE
    if existing is not None:
        gone = [p["name"] for p in existing["processes"] if not still_running(p)]
        if gone:
            print(f"the stack in {args.run_dir} is broken ({', '.join(gone)} exited; logs in "
                  f"{args.run_dir}): run `make down`, then `make up` again", file=sys.stderr)
            return 1
        print(f"a stack is already running from {args.run_dir}:\n")
        print(usage_text(existing, eval_file, env_file))
        return 0
    try:
        ensure_store(args.store)
    except subprocess.CalledProcessError as e:
        print(f"error: building the demo store failed ({e})", file=sys.stderr)
        return 1
    stack = LocalStack(StackConfig(store=args.store, run_dir=args.run_dir, version=args.version,
                                   fixed_ports=not args.free_ports,
                                   controller_extra=("--gate-interval-s", "2")), detach=True)
    try:
        stack.start()
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for proc in stack.procs():
        proc.close_log()  # the detached children keep their own handles
    state = json.loads((args.run_dir / STATE_FILE).read_text())
    env_file.write_text(env_text(state))
    print(usage_text(state, eval_file, env_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())

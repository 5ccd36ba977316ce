"""`deployctl delta ...`: the delta stream's operator commands (over the controller's API).

    deployctl delta status [MODEL]
    deployctl delta pause MODEL [--reason TEXT]
    deployctl delta resume MODEL
    deployctl delta advance MODEL [--to SEQ] [--no-wait]
    deployctl delta revert MODEL --to SEQ [--reason TEXT] [--no-wait]

`advance` and `revert` wait for the operation to end and exit 0 when it committed, 1 when
it failed or rolled back (the reason is printed), 2 when the controller refused it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Protocol, TextIO

EXIT_OK, EXIT_FAILED = 0, 1


class Api(Protocol):
    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]: ...


def _seq(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"wants a delta seq (an integer >= 0), got {s!r}")
    return n


def add_parser(sp: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The `delta` subcommand and its own subcommands."""
    d = sp.add_parser("delta", parents=parents, help="delta streams: fresh rows between "
                      "releases (status, pause, resume, advance, revert)")
    dsp = d.add_subparsers(dest="delta_cmd", required=True, metavar="ACTION")
    s = dsp.add_parser("status", parents=parents, help="committed/newest seq, state, lag, "
                       "every server's seq")
    s.add_argument("model", nargs="?", help="default: every stream")
    p = dsp.add_parser("pause", parents=parents, help="stop following new deltas")
    p.add_argument("model")
    p.add_argument("--reason", default="")
    r = dsp.add_parser("resume", parents=parents, help="follow new deltas again")
    r.add_argument("model")
    a = dsp.add_parser("advance", parents=parents, help="advance to the newest (or a given) seq")
    a.add_argument("model")
    a.add_argument("--to", type=_seq, metavar="SEQ", help="default: the newest that verifies")
    v = dsp.add_parser("revert", parents=parents, help="rankers back to SEQ; the stream pauses")
    v.add_argument("model")
    v.add_argument("--to", type=_seq, metavar="SEQ", required=True)
    v.add_argument("--reason", default="")
    for x in (a, v):
        x.add_argument("--no-wait", action="store_true", help="start it and return")
        x.add_argument("--poll", type=float, default=0.5, help="seconds between polls")


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def render(st: dict[str, Any]) -> list[str]:
    """Human lines for one stream's status."""
    lines = [f"{st['model']} {st['version']}  state {st['state']}  committed seq "
             f"{st['committed_seq']}  newest on disk {st.get('newest_seq', '-')}"
             + (f"  target {st['target']}" if st.get("target") is not None else "")
             + f"  freshness lag {_age(st.get('freshness_lag_s'))}"]
    if st.get("paused"):
        lines.append(f"  paused ({st['paused']}): {st['pause_reason']}")
    if st.get("follow_error"):
        lines.append(f"  follower: {st['follow_error']}")
    for rep in st.get("replicas", []):
        what = rep.get("error") or (f"readable {rep['readable_seqs']}  applied "
                                    f"{rep['applied_seq']}  overlay {rep['overlay_bytes']} B")
        lines.append(f"  shard {rep['shard']} {rep['replica']}  {what}")
    for rk in st.get("rankers", []):
        lines.append(f"  ranker {rk['ranker']}  " + (rk.get("error") or f"seq {rk['seq']}"))
    if st.get("fleet_error"):
        lines.append(f"  fleet: {st['fleet_error']}")
    for op in st.get("operations", [])[:3]:
        lines.append(f"  {op['id']}  {op['kind']} {op['from_seq']} -> {op['to_seq']}  "
                     f"{op['status']}" + (f" ({op['step']})" if op["status"] == "running" else "")
                     + (f"  {op['reason']}" if op["reason"] else ""))
    return lines


def _wait(api: Api, model: str, op_id: str, poll_s: float, out: TextIO) -> int:
    """Poll the stream until the operation ends; its outcome is the exit code."""
    last = ""
    while True:
        st = api.call("GET", f"/v1/deltas/{model}")
        op = next((o for o in st["operations"] if o["id"] == op_id), None)
        if op is None:  # pushed out of the recent list: it ended long ago
            print(f"{op_id}: ended (see deployctl delta status {model})", file=out)
            return EXIT_OK
        line = f"{op['kind']} {op['from_seq']} -> {op['to_seq']}: {op['status']} ({op['step']})"
        if line != last:
            print(line, file=out, flush=True)
            last = line
        if op["status"] != "running":
            if op["reason"]:
                print(f"  reason: {op['reason']}", file=out)
            return EXIT_OK if op["status"] == "committed" else EXIT_FAILED
        time.sleep(poll_s)


def run(api: Api, args: argparse.Namespace, out: TextIO) -> int:
    cmd, model = args.delta_cmd, args.model
    if cmd == "status":
        data = (api.call("GET", f"/v1/deltas/{model}") if model
                else api.call("GET", "/v1/deltas"))
        if args.json:
            print(json.dumps(data, indent=2), file=out)
            return EXIT_OK
        streams = [data] if model else data["streams"]
        for st in streams:
            print("\n".join(render(st)), file=out)
        if not streams:
            print("no delta stream yet", file=out)
        return EXIT_OK
    if cmd in ("pause", "resume"):
        body = {"reason": args.reason} if cmd == "pause" and args.reason else None
        st = api.call("POST", f"/v1/deltas/{model}/{cmd}", body)
        print(json.dumps(st, indent=2) if args.json else
              f"{model} {st['version']} at seq {st['committed_seq']}: "
              + (f"paused ({st['pause_reason']})" if st["paused"] else "following"), file=out)
        return EXIT_OK
    body = {"to": args.to} if args.to is not None else {}
    if cmd == "revert" and args.reason:
        body["reason"] = args.reason
    op = api.call("POST", f"/v1/deltas/{model}/{cmd}", body or None)
    if args.no_wait:
        print(json.dumps(op, indent=2) if args.json else
              f"{op['id']}: {op['kind']} {op['from_seq']} -> {op['to_seq']} started", file=out)
        return EXIT_OK
    return _wait(api, model, str(op["id"]), args.poll, out)

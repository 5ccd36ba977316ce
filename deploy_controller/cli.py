"""`deployctl`: the operator's CLI over the controller's HTTP API.

    deployctl rollout MODEL VERSION [--canary 5,25,100] [--bake SECONDS] [--no-wait]
                      [--strategy auto|in-place|blue-green] [--plan]
    deployctl status [ROLLOUT_ID | MODEL]
    deployctl abort ROLLOUT_ID | MODEL [--reason TEXT]
    deployctl rollback MODEL [--reason TEXT] [--bake SECONDS] [--no-wait]
    deployctl history [--model MODEL] [--limit N]
    deployctl delta status [MODEL] | pause MODEL | resume MODEL
    deployctl delta advance MODEL [--to SEQ] | revert MODEL --to SEQ   (see delta_cli.py)

The controller's URL comes from --controller or DEPLOYCTL_CONTROLLER, the token from
--token-file or DEPLOYCTL_TOKEN; both options go before or after the subcommand.
`rollout --plan` prints the plan (strategy and why, every step, what each shard
replica holds after it, the capacity rule's verdict) and starts nothing.
`rollout` and `rollback` follow the rollout live and exit 1 if it ends rolled back or
failed (0 when it succeeded, 2 when the controller refused or could not be reached).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from deploy_controller import delta_cli
from deploy_controller.plan_view import render_plan

DEFAULT_CONTROLLER = "http://127.0.0.1:8090"
EXIT_OK, EXIT_ROLLED_BACK, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    pass


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options valid before and after the subcommand (SUPPRESS keeps the earlier value)."""
    p = argparse.ArgumentParser(add_help=False)
    d = argparse.SUPPRESS if suppress else None
    p.add_argument("--controller", default=d, metavar="URL",
                   help=f"controller URL (env DEPLOYCTL_CONTROLLER, default {DEFAULT_CONTROLLER})")
    p.add_argument("--token-file", default=d, type=Path, metavar="FILE",
                   help="file holding the admin bearer token (or env DEPLOYCTL_TOKEN)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print raw JSON")
    p.add_argument("--timeout", type=float, default=d, metavar="S",
                   help="HTTP timeout in seconds (default 30)")
    return p


def _canary(s: str) -> list[int]:
    # Every item must be a number: "10,,100" is a typo to refuse, not 10,100 to roll out.
    try:
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--canary wants percentages like 5,25,100, got {s!r}") from None


def _seconds(s: str) -> float:
    """A duration in seconds: a finite number >= 0 (argparse turns the refusal into exit 2)."""
    try:
        x = float(s)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"wants a number of seconds >= 0, got {s!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    sub_common = _common(suppress=True)
    p = argparse.ArgumentParser(prog="deployctl", parents=[_common(suppress=False)],
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sp.add_parser("rollout", parents=[sub_common], help="roll MODEL out to VERSION")
    r.add_argument("model")
    r.add_argument("version")
    r.add_argument("--canary", type=_canary, help="traffic shares in percent (default 5,25,100)")
    r.add_argument("--bake", type=_seconds, metavar="SECONDS",
                   help="watch time per canary step")
    r.add_argument("--no-wait", action="store_true", help="start it and return")
    r.add_argument("--strategy", choices=("auto", "in-place", "blue-green"),
                   help="auto (default): in place when both versions fit every shard "
                   "replica, blue/green (one version per replica, in waves) when not")
    r.add_argument("--plan", action="store_true", help="print the plan, start nothing")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between progress polls")
    s = sp.add_parser("status", parents=[sub_common], help="a rollout, or what is running")
    s.add_argument("target", nargs="?", help="rollout id or model (default: all active)")
    a = sp.add_parser("abort", parents=[sub_common], help="abort a rollout (it rolls back)")
    a.add_argument("target", help="rollout id, or a model with an active rollout")
    a.add_argument("--reason", default="")
    b = sp.add_parser("rollback", parents=[sub_common],
                      help="abort MODEL's rollout, or roll it back to the previous version")
    b.add_argument("model")
    b.add_argument("--reason", default="")
    b.add_argument("--bake", type=_seconds, metavar="SECONDS")
    b.add_argument("--no-wait", action="store_true")
    b.add_argument("--poll", type=float, default=1.0)
    h = sp.add_parser("history", parents=[sub_common], help="past rollouts, newest first")
    h.add_argument("--model")
    h.add_argument("--limit", type=int, default=20)
    delta_cli.add_parser(sp, [sub_common])
    return p


class Api:
    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._c = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self._c.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the controller at {self.url}: {e}") from None
        try:
            data: dict[str, Any] = resp.json()
        except ValueError:
            data = {"detail": resp.text}
        if resp.status_code >= 400:
            detail = data.get("detail", data)
            raise CliError(f"{method} {path}: HTTP {resp.status_code}: "
                           f"{detail if isinstance(detail, str) else json.dumps(detail)}")
        return data


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def render(r: dict[str, Any]) -> list[str]:
    """Human lines for one rollout: header, per-server state, traffic share, last gate."""
    lines = [f"{r['id']}  {r['model']} {r['from_version']} -> {r['to_version']}  "
             f"{r['status']}  phase {r['phase']}  step {r['step']}"]
    if r.get("plan", {}).get("why"):
        lines.append(f"  strategy {r['strategy']}: {r['plan']['why']}")
    if r.get("reason"):
        lines.append(f"  reason: {r['reason']}")
    fleet = r.get("fleet") or {}
    for url, st in (fleet.get("rankers") or {}).items():
        if "error" in st:
            lines.append(f"  ranker {url}: {st['error']}")
            continue
        split = " ".join(f"{v}={_pct(s)}" for v, s in sorted(st.get("split", {}).items()))
        held = " ".join(f"{v['version']}:{v['state']}" for v in st.get("versions", []))
        lines.append(f"  ranker {url}  traffic {split or '-'}  holds {held or '-'}")
    for shard in fleet.get("shards") or []:
        reps = "  ".join(
            f"{a} " + (st["error"] if "error" in st else
                       " ".join(f"{v}:{s}" for v, s in sorted(st.items())) or "-")
            for a, st in shard["replicas"].items())
        lines.append(f"  shard {shard['shard']}  {reps}")
    gate = r.get("gate") or {}
    if gate.get("new"):
        n, o = gate["new"], gate.get("old") or {}
        p99 = f"{n['p99_s'] * 1e3:.1f} ms" if n.get("p99_s") is not None else "-"
        op99 = f"{o['p99_s'] * 1e3:.1f} ms" if o.get("p99_s") is not None else "-"
        verdict = "ok" if gate.get("ok") else "FAILING"
        if gate.get("ok") and not gate.get("conclusive", True):
            verdict = "ok (too few requests to judge)"
        lines.append(f"  gate {verdict}: new {n['requests']:g} req, "
                     f"{n['errors']:g} errors, p99 {p99} (old {op99}), "
                     f"mismatches {gate.get('mismatch', 0):g}")
        lines.extend(f"    {f}" for f in gate.get("failures", []))
    return lines


def render_convergence(r: dict[str, Any]) -> list[str]:
    """The model's desired state and the controller's last reconcile pass."""
    lines = []
    want = r.get("desired")
    if want:
        split = " ".join(f"{v}={_pct(s)}" for v, s in sorted(want["split"].items()))
        deltas = " ".join(f"{v}@{s}" for v, s in sorted((want.get("deltas") or {}).items()))
        who = ("rankers hold" if r.get("strategy") == "blue_green" and r.get("status") in
               ("running", "rolling_back") else "every server holds")  # replicas: one each
        lines.append(f"  desired: active {want['active']}, {who} "
                     f"{','.join(want['versions'])}, traffic {split}"
                     + (f", delta seqs {deltas}" if deltas else "") + f" (seq {want['seq']})")
    if r.get("desired_error"):
        lines.append(f"  desired state NOT WRITTEN: {r['desired_error']}")
    rec = r.get("reconcile")
    if rec:
        when = time.strftime("%H:%M:%S", time.localtime(rec["at"]))
        state = ("converged" if not rec["drift"] and not rec["errors"] else
                 f"drift {len(rec['drift'])}, repairs {len(rec['repairs'])}, "
                 f"errors {len(rec['errors'])}")
        lines.append(f"  reconcile (every {rec['interval_s']:g} s, last at {when}): {state}"
                     + (f", skipped {', '.join(rec['skipped'])} (a step was acting)"
                        if rec["skipped"] else ""))
        lines.extend(f"    {kind}: {x}" for kind in ("drift", "repairs", "errors")
                     for x in rec[kind])
    return lines


def follow(api: Api, rollout_id: str, poll_s: float, out: TextIO) -> int:
    """Print progress whenever it changes; the exit code says how the rollout ended."""
    start, last = time.monotonic(), None
    while True:
        r = api.call("GET", f"/v1/rollouts/{rollout_id}")
        lines = render(r)
        if lines != last:
            print(f"[{time.monotonic() - start:6.1f}s] " + "\n".join(lines), file=out, flush=True)
            last = lines
        if r["status"] not in ("running", "rolling_back"):
            return EXIT_OK if r["status"] == "succeeded" else EXIT_ROLLED_BACK
        time.sleep(poll_s)


def _resolve(api: Api, target: str) -> str:
    """A rollout id, or the id of the active rollout of a model named `target`."""
    if target.startswith("r-"):
        return target
    active = api.call("GET", "/v1/rollouts", params={"model": target})["active"]
    if not active:
        raise CliError(f"no active rollout of model {target!r}")
    return str(active[0]["id"])


def run(args: argparse.Namespace, out: TextIO) -> int:
    url = args.controller or os.environ.get("DEPLOYCTL_CONTROLLER") or DEFAULT_CONTROLLER
    token = os.environ.get("DEPLOYCTL_TOKEN")
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise CliError(f"token file {args.token_file}: {e.strerror or e}") from None
    api = Api(url, token, args.timeout or 30.0)
    needs_token = args.cmd in ("rollout", "abort", "rollback") or (
        args.cmd == "delta" and args.delta_cmd != "status")
    if needs_token and not token:
        raise CliError("this command needs the admin token: --token-file FILE or DEPLOYCTL_TOKEN")

    def show(data: Any) -> None:
        if args.json:
            print(json.dumps(data, indent=2), file=out)
        elif isinstance(data, dict) and "id" in data:
            print("\n".join(render(data)), file=out)

    if args.cmd == "delta":
        return delta_cli.run(api, args, out)
    if args.cmd == "rollout":
        body = {"model": args.model, "version": args.version, "canary": args.canary,
                "bake_s": args.bake, "strategy": args.strategy}
        body = {k: v for k, v in body.items() if v is not None}
        if args.plan:
            p = api.call("POST", "/v1/rollouts/plan", body)
            print(json.dumps(p, indent=2) if args.json else "\n".join(render_plan(p)), file=out)
            return EXIT_OK if p["verdict"] == "ok" else EXIT_ROLLED_BACK
        r = api.call("POST", "/v1/rollouts", body)
        if args.no_wait:
            show(r)
            return EXIT_OK
        return follow(api, r["id"], args.poll, out)
    if args.cmd == "rollback":
        body = {"reason": args.reason} | ({"bake_s": args.bake} if args.bake is not None else {})
        r = api.call("POST", f"/v1/models/{args.model}/rollback", body)
        if args.no_wait:
            show(r)
            return EXIT_OK
        return follow(api, r["id"], args.poll, out)
    if args.cmd == "abort":
        show(api.call("POST", f"/v1/rollouts/{_resolve(api, args.target)}/abort",
                      {"reason": args.reason}))
        return EXIT_OK
    if args.cmd == "status":
        if args.target and args.target.startswith("r-"):
            show(api.call("GET", f"/v1/rollouts/{args.target}"))
            return EXIT_OK
        listing = api.call("GET", "/v1/rollouts",
                           params={"model": args.target} if args.target else None)
        if args.json:
            show(listing)
        elif listing["active"]:
            for r in listing["active"]:
                show(r)
                print("\n".join(render_convergence(r)), file=out)
        else:
            print("no active rollout" + (f" of {args.target}" if args.target else ""), file=out)
            if listing["recent"]:
                print("latest:", file=out)
                latest = api.call("GET", f"/v1/rollouts/{listing['recent'][0]['id']}")
                show(latest)
                print("\n".join(render_convergence(latest)), file=out)
        return EXIT_OK
    # history
    params = {"limit": args.limit} | ({"model": args.model} if args.model else {})
    data = api.call("GET", "/v1/history", params=params)
    if args.json:
        show(data)
        return EXIT_OK
    for r in data["rollouts"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        took = (f"{r['finished_at'] - r['created_at']:.0f}s" if r["finished_at"] else "-")
        print(f"{r['id']}  {when}  {r['model']} {r['from_version']} -> {r['to_version']}  "
              f"{r['status']:<12} {r.get('strategy', 'in_place'):<10} {took:>6}  "
              f"{r['reason']}", file=out)
    return EXIT_OK


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, out or sys.stdout)
    except CliError as e:
        print(f"deployctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ndeployctl: stopped watching; the rollout goes on (deployctl status)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

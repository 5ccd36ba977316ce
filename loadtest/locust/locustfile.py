"""Locust load on the ranker's POST /v1/rank, with requests from a version's eval.jsonl.

    locust -f loadtest/locust/locustfile.py --headless -u 8 -r 8 --run-time 30s \\
        --host http://127.0.0.1:8080 --eval demo_store/ads_ctr/v2/eval.jsonl \\
        --csv build/locust/run --csv-full-history

Each user sends `--user-rps` requests per second (0: back to back), JSON, protobuf
(`application/x-protobuf`, ranker_server.codec.encode_request) or a 50/50 mix
(`--body`). Labels are stripped from the bodies and kept beside them: each answer's
scores are checked (one finite score in [0, 1] per candidate) and credited to the
version the answer names. Requests show up in Locust's stats as `/v1/rank <body> <version>`,
so Locust's own table gives each version's traffic and latency.

With `--csv PREFIX` (or `--request-log`/`--served-out`) it also writes
PREFIX_requests.csv (one row per request: start time, latency, status, version) and
PREFIX_served.json (requests, traffic share and served AUC per version), which
loadtest/locust/report.py plots. Bounds, loopback-only and the SLO exit code: loadtest/locust/hooks.py.
Add loadtest/locust/shapes.py (`-f loadtest/locust/locustfile.py,loadtest/locust/shapes.py`) for a step load.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from locust import FastHttpUser, constant_throughput, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner

from loadtest.locust.hooks import on  # also registers the shared options and listeners
from loadtest.locust.served import EvalSet, RemoteTargetError, ServedLog, check_loopback

log = logging.getLogger("loadtest.rank")
DEFAULT_EVAL = "demo_store/ads_ctr/v1/eval.jsonl"
JSON_HEADERS = {"content-type": "application/json"}
PROTOBUF_HEADERS = {"content-type": "application/x-protobuf"}


@on("init_command_line_parser")
def _options(parser: Any, **_: Any) -> None:
    g = parser.add_argument_group("ranker load (loadtest/locust/locustfile.py)")
    g.add_argument("--eval", type=str, default=DEFAULT_EVAL, env_var="LOADTEST_EVAL",
                   help=f"eval.jsonl of a model version (default {DEFAULT_EVAL})")
    g.add_argument("--eval-limit", type=int, default=0,
                   help="use only the first N eval requests (default: all)")
    g.add_argument("--body", choices=["json", "protobuf", "mixed"], default="json",
                   help="request body format (default json)")
    g.add_argument("--user-rps", type=float, default=10.0,
                   help="requests per second per user; 0 = back to back (default 10)")
    g.add_argument("--request-log", type=str, default="",
                   help="CSV of every request (default PREFIX_requests.csv with --csv)")
    g.add_argument("--served-out", type=str, default="",
                   help="JSON of requests and served AUC per version "
                        "(default PREFIX_served.json with --csv)")


class Workload:
    """The eval requests as ready-to-send bodies (protobuf encoded on first use)."""

    def __init__(self, evalset: EvalSet) -> None:
        self.evalset = evalset
        self.json_bodies = [json.dumps(r, separators=(",", ":")).encode()
                            for r in evalset.requests]
        self._pb: list[bytes | None] = [None] * len(evalset.requests)
        self._schema: Any = None
        self.sizes = [len(r["candidates"]) for r in evalset.requests]

    def body(self, i: int, kind: str) -> bytes:
        if kind == "json":
            return self.json_bodies[i]
        cached = self._pb[i]
        if cached is None:
            if self._schema is None:
                from modelpack.manifest import read_manifest

                self._schema = read_manifest(self.evalset.path.parent).schema
            from ranker_server.codec import encode_request

            cached = self._pb[i] = encode_request(self.evalset.requests[i], self._schema)
        return cached


def parse_answer(status: int, content: bytes, content_type: str, expected: int
                 ) -> tuple[str, np.ndarray | None, str]:
    """(version, scores, error) of one /v1/rank answer; error is '' when it is good."""
    if status != 200:
        detail = content[:200].decode(errors="replace")
        return "", None, f"HTTP {status}: {detail}"
    try:
        if content_type.startswith("application/x-protobuf"):
            from protos import ranker_pb2

            msg = ranker_pb2.RankResponse.FromString(content)
            version, scores = msg.version, np.frombuffer(msg.scores, dtype="<f4")
        else:
            obj = json.loads(content)
            version, scores = obj["version"], np.asarray(obj["scores"], dtype=np.float32)
    except Exception as e:  # a malformed 200 is a failure, whatever broke
        return "", None, f"unreadable answer: {type(e).__name__}: {e}"
    if not version:
        return "", None, "answer names no version"
    if scores.size != expected:
        return version, None, f"{scores.size} scores for {expected} candidates"
    if not (np.isfinite(scores).all() and scores.min() >= 0 and scores.max() <= 1):
        return version, None, "scores not finite probabilities"
    return version, scores, ""


class RankUser(FastHttpUser):
    """POST /v1/rank at `--user-rps`, cycling through the eval requests from a random start."""

    host = "http://127.0.0.1:8080"
    workload: ClassVar[Workload | None] = None
    served: ClassVar[ServedLog | None] = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        rate = float(getattr(opts, "user_rps", 10.0)) if opts else 10.0
        self._pace = constant_throughput(rate) if rate > 0 else None
        self._body = str(getattr(opts, "body", "json")) if opts else "json"
        self._rng = random.Random()
        self._order: itertools.cycle[int] | None = None

    def wait_time(self) -> float:
        return float(self._pace(self)) if self._pace is not None else 0.0

    def on_start(self) -> None:
        try:  # the host can be changed in the web UI after init
            check_loopback(self.host, bool(getattr(self.environment.parsed_options,
                                                   "allow_remote", False)))
        except RemoteTargetError as e:
            log.error("%s", e)
            raise StopUser() from None
        if RankUser.workload is None:
            raise StopUser()
        n = len(RankUser.workload.sizes)
        start = self._rng.randrange(n)
        self._order = itertools.cycle(list(range(start, n)) + list(range(start)))

    @task
    def rank(self) -> None:
        wl, order = RankUser.workload, self._order
        assert wl is not None and order is not None
        i = next(order)
        kind = self._body if self._body != "mixed" else self._rng.choice(("json", "protobuf"))
        headers = JSON_HEADERS if kind == "json" else PROTOBUF_HEADERS
        t = time.time()
        with self.client.post("/v1/rank", data=wl.body(i, kind),  # type: ignore[arg-type]
                              headers=headers,
                              name=f"/v1/rank {kind}", catch_response=True) as resp:
            status = int(resp.status_code or 0)
            ctype = resp.headers.get("content-type", "") if resp.headers else ""
            if status == 0:
                version, scores, error = "", None, f"connection error: {resp.error}"
            else:
                version, scores, error = parse_answer(status, resp.content or b"", ctype,
                                                      wl.sizes[i])
            if error:
                resp.failure(error)
            else:
                resp.request_meta["name"] = f"/v1/rank {kind} {version}"
                resp.success()
            latency = float(resp.request_meta.get("response_time") or 0.0)
        if RankUser.served is not None:
            RankUser.served.record(t, latency, status, "" if error else version, kind, scores,
                                   wl.evalset.labels[i])


def _default_path(environment: Environment, explicit: str, suffix: str) -> Path | None:
    if explicit:
        return Path(explicit)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    return Path(f"{prefix}_{suffix}") if prefix else None


@on("init")
def _load(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, MasterRunner):
        return  # the master runs no users
    path = Path(str(getattr(opts, "eval", DEFAULT_EVAL)))
    try:
        evalset = EvalSet.load(path, int(getattr(opts, "eval_limit", 0)))
    except (OSError, ValueError) as e:
        log.error("cannot read --eval %s: %s (build the demo store: "
                  "python -m modelpack demo --store demo_store)", path, e)
        raise SystemExit(2) from None
    RankUser.workload = Workload(evalset)
    log.info("%d eval requests from %s, %s bodies", len(evalset.requests), path,
             getattr(opts, "body", "json"))
    req_log = _default_path(environment, str(getattr(opts, "request_log", "")), "requests.csv")
    if req_log is not None:
        req_log.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered rows would cost a syscall per request; flushed and closed at quit.
    RankUser.served = ServedLog(open(req_log, "w", newline="", encoding="utf-8")  # noqa: SIM115
                                if req_log is not None else None)


@on("quitting")
def _write_served(environment: Environment, **_: Any) -> None:
    served, wl = RankUser.served, RankUser.workload
    if served is None or wl is None:
        return
    served.close()
    summary = served.summary()
    offline = wl.evalset.offline_auc()
    summary["eval"] = str(wl.evalset.path)
    summary["offline_int4_auc"] = offline
    for v, s in summary["versions"].items():
        log.info("version %s: %d requests (%.1f%%), served AUC %s", v, s["requests"],
                 100 * s["share"], s["served_auc"])
    out = _default_path(environment, str(getattr(environment.parsed_options, "served_out", "")),
                        "served.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        tmp.replace(out)
    if offline is not None and not math.isnan(offline):
        log.info("offline INT4 AUC of %s: %.4f", wl.evalset.path, offline)

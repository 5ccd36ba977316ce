"""Locust options and listeners shared by every load script here (imported once per process).

Registers, on Locust's global `events`:
- options `--allow-remote`, `--max-requests`, `--time-limit`, `--slo-max-failure-ratio`,
  `--slo-p99-ms`, `--slo-min-requests`, and the step shape's `--step-*` options;
- `init`: refuse non-loopback targets (exit code 2) unless `--allow-remote`;
- `test_start`: a watcher that quits the run at `--max-requests` or `--time-limit`, so
  a script is bounded even when `--run-time` is forgotten;
- `quitting`: the SLO verdict (failure ratio, p99 over the whole run) is the exit code:
  a breach is logged and exits 1, a run within the SLO exits 0 (a few failures allowed).

Importing this module imports Locust, which monkey-patches the process with gevent:
only load scripts import it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from locust import events
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtest.locust.served import RemoteTargetError, check_loopback, slo_problems

log = logging.getLogger("loadtest")
F = TypeVar("F", bound=Callable[..., Any])


def on(event: str) -> Callable[[F], F]:
    """`@on("init")`: add the function as a listener of Locust's global `events.<event>`."""

    def register(fn: F) -> F:
        hook: Any = getattr(events, event)
        hook.add_listener(fn)
        return fn

    return register


@on("init_command_line_parser")
def _options(parser: Any, **_: Any) -> None:
    g = parser.add_argument_group("loadtest bounds and SLO")
    g.add_argument("--allow-remote", action="store_true", default=False,
                   help="allow a target host that is not 127.0.0.1/localhost/::1")
    g.add_argument("--max-requests", type=int, default=200_000, env_var="LOADTEST_MAX_REQUESTS",
                   help="stop the run after this many requests (default 200000)")
    g.add_argument("--time-limit", type=float, default=900.0, env_var="LOADTEST_TIME_LIMIT",
                   help="stop the run after this many seconds even without --run-time "
                        "(default 900)")
    g.add_argument("--slo-max-failure-ratio", type=float, default=0.01,
                   help="exit 1 if failures/requests exceeds this (default 0.01; < 0: off)")
    g.add_argument("--slo-p99-ms", type=float, default=1000.0,
                   help="exit 1 if the whole run's p99 exceeds this many ms (default 1000; 0: off)")
    g.add_argument("--slo-min-requests", type=int, default=1,
                   help="exit 1 if fewer requests than this were made (default 1)")
    s = parser.add_argument_group("step shape (loadtest/locust/shapes.py)")
    s.add_argument("--step-users", type=int, default=4, help="users added per step (default 4)")
    s.add_argument("--step-seconds", type=float, default=10.0, help="seconds per step (default 10)")
    s.add_argument("--steps", type=int, default=3, help="steps before the run ends (default 3)")


def _opt(environment: Environment, name: str, default: Any) -> Any:
    return getattr(environment.parsed_options, name, default) if environment.parsed_options \
        else default


@on("init")
def _loopback_only(environment: Environment, **_: Any) -> None:
    allow = bool(_opt(environment, "allow_remote", False))
    for cls in environment.user_classes:
        try:
            check_loopback(environment.host or cls.host, allow)
        except RemoteTargetError as e:
            log.error("%s: %s", cls.__name__, e)
            sys.exit(2)


def _watch(environment: Environment, max_requests: int, time_limit: float) -> None:
    start = time.monotonic()
    runner = environment.runner
    while runner is not None and runner.state not in ("stopped", "quitting"):
        n = environment.stats.total.num_requests
        if max_requests > 0 and n >= max_requests:
            log.info("--max-requests %d reached; stopping", max_requests)
            runner.quit()
            return
        if time_limit > 0 and time.monotonic() - start > time_limit:
            log.info("--time-limit %.0f s reached; stopping", time_limit)
            runner.quit()
            return
        gevent.sleep(0.2)


@on("test_start")
def _bounds(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    gevent.spawn(_watch, environment, int(_opt(environment, "max_requests", 200_000)),
                 float(_opt(environment, "time_limit", 900.0)))


@on("quitting")
def _slo(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) if total.num_requests else None
    problems = slo_problems(
        total.num_requests, total.num_failures, p99,
        max_failure_ratio=float(_opt(environment, "slo_max_failure_ratio", 0.01)),
        max_p99_ms=float(_opt(environment, "slo_p99_ms", 1000.0)),
        min_requests=int(_opt(environment, "slo_min_requests", 1)))
    if problems:
        for p in problems:
            log.error("SLO breached: %s", p)
        environment.process_exit_code = 1
    else:
        environment.process_exit_code = 0  # the SLO is the verdict, not "any failure at all"
        log.info("SLO met: %d requests, %d failures, p99 %s ms", total.num_requests,
                 total.num_failures, p99)

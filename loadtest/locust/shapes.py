"""A step load: `--step-users` more users every `--step-seconds`, `--steps` times, then stop.

    locust -f loadtest/locust/locustfile.py,loadtest/locust/shapes.py --headless \\
        --host http://127.0.0.1:8080 --eval demo_store/ads_ctr/v1/eval.jsonl \\
        --step-users 4 --step-seconds 10 --steps 3

runs 4, 8, then 12 users for 10 s each and ends after 30 s: the shape is bounded by
itself (Locust ignores `--run-time`, `-u` and `-r` when a shape is loaded). Users start
at `--step-users` per second. Watch where p99 bends upwards to find the knee.
"""

from __future__ import annotations

import time

from locust import LoadTestShape

from loadtest.locust import hooks  # noqa: F401 (registers --step-* and the shared bounds)
from loadtest.locust.served import step_at


class StepLoadShape(LoadTestShape):
    """`--step-users` * (k + 1) users during step k, `--step-seconds` per step, `--steps` steps."""

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options if self.runner is not None else None
        users = int(getattr(opts, "step_users", 4))
        seconds = float(getattr(opts, "step_seconds", 10.0))
        steps = int(getattr(opts, "steps", 3))
        wanted = step_at(time.perf_counter() - self.start_time, users, seconds, steps)
        return None if wanted is None else (wanted, float(users))

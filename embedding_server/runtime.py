"""Process plumbing shared by a server and the --workers supervisor (no heavy imports)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)


def write_port_file(path: Path, port: int, metrics_port: int | None,
                    admin_port: int | None = None) -> None:
    """Line 1: gRPC port; line 2 (if metrics are on): metrics port; then `admin=PORT` (with
    --admin-port). Written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n" + (f"{metrics_port}\n" if metrics_port is not None else "")
                   + (f"admin={admin_port}\n" if admin_port is not None else ""))
    os.replace(tmp, path)


def setup_logging(level: str) -> None:
    # force: importing fbgemm_gpu already installed a root handler at WARNING.
    logging.basicConfig(level=level.upper(), force=True,
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_tbe_chatter)


def _drop_tbe_chatter(record: logging.LogRecord) -> bool:
    # FBGEMM logs a feature-gate line to the root logger for every TBE it builds.
    return not (record.name == "root" and str(record.msg).startswith("[TBE="))


def stop_event(doing: str) -> threading.Event:
    """An event set by the first SIGTERM or SIGINT (logged as `doing`): the graceful stop."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: %s", signal.Signals(signum).name, doing)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop

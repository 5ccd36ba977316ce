"""`python -m embedding_server` / `embedding-server`: see `--help`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from embedding_server.config import ConfigError, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
    except ConfigError as e:
        print(f"embedding-server: error: {e}", file=sys.stderr)
        return 2
    if cfg.workers > 1:
        from embedding_server.workers import supervise

        return supervise(cfg)
    from embedding_server.server import serve

    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m loadtest.stack up|down|status`: the local fleet (see loadtest.stack.cli)."""

from loadtest.stack.cli import main

raise SystemExit(main())

"""`python -m loadtest.stack up|down|status`: the local fleet (see loadtest.stack.local)."""

from loadtest.stack.local import main

raise SystemExit(main())

"""`python -m lockbroker.client.cli`, as before the CLI became a package (same as `python -m lockbroker.client`)."""

from lockbroker.client.cli import main

raise SystemExit(main())

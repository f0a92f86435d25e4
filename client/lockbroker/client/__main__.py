"""`python -m lockbroker.client`: the client commands of `lockbroker` (see lockbroker.client.cli)."""

from lockbroker.client.cli import main

raise SystemExit(main())

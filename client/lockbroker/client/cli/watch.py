"""`lockbroker watch NAME [--prefix] [--start-revision N]`: follow a lock's events.

One JSON line per event on stdout (always JSON: a stream of events is for programs and `jq`), until
interrupted. The first lines, marked "snapshot": true, are the state at the start (holder as
GRANTED, waiters as WAITER_QUEUED) unless --start-revision resumes after an earlier watch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import EXIT_OK, Output
from lockbroker.client.cli._runner import Signals, add_command


async def cmd_watch(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    async for event in client.watch(args.name, args.prefix, args.start_revision):
        print(json.dumps(event.to_dict()), file=out.stream, flush=True)
    return EXIT_OK


def _revision(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a revision (an integer >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a revision is an integer >= 0")
    return value


def add_watch_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(
        subparsers,
        "watch",
        cmd_watch,
        "print a lock's events (granted, released, expired, revoked, waiter queued/left) as JSON lines",
        common,
    )
    p.add_argument("name", metavar="NAME", help="the lock (with --prefix: a name prefix, may be empty)")
    p.add_argument("--prefix", action="store_true", help="watch every lock whose name starts with NAME")
    p.add_argument(
        "--start-revision", type=_revision, default=None, help="resume after this revision (the last event's)"
    )

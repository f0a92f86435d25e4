"""`lockbroker check-fence NAME TOKEN`: is this fencing token still the lock's current grant?

For scripts that guard a resource: exit 0 when the token is CURRENT, 1 when it is STALE (a newer
grant holds the lock, or it is free), like `test`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import EXIT_NOT_ACQUIRED, EXIT_OK, Output
from lockbroker.client.cli._runner import Signals, add_command


async def cmd_check_fence(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    fence = await client.check_fence(args.name, args.fencing_token)
    data = {
        "name": args.name,
        "fencing_token": str(args.fencing_token),
        "status": "CURRENT" if fence.current else "STALE",
        "current_fencing_token": str(fence.current_fencing_token),
    }
    if fence.current:
        out.result(data, f"CURRENT: fencing token {args.fencing_token} holds {args.name!r}")
        return EXIT_OK
    now = f"held with token {fence.current_fencing_token}" if fence.current_fencing_token else "free"
    out.result(data, f"STALE: fencing token {args.fencing_token} no longer holds {args.name!r} (it is {now})")
    return EXIT_NOT_ACQUIRED


def _token(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fencing token (a positive integer)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a fencing token is a positive integer")
    return value


def add_fence_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(
        subparsers,
        "check-fence",
        cmd_check_fence,
        "check whether a fencing token is still the lock's current grant (exit 0 CURRENT, 1 STALE)",
        common,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("fencing_token", metavar="TOKEN", type=_token)

"""`lockbroker session create`, `keepalive` and `close`: sessions for scripts."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import (
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_OK,
    Output,
    _number,
    _positive,
    _when,
    default_owner,
    session_json,
)
from lockbroker.client.cli._runner import Signals, add_command


async def cmd_session_create(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    owner = args.owner if args.owner is not None else default_owner()
    session = await client.create_session(args.ttl, owner, args.request_id)
    out.result(
        session_json(session, owner),
        f"session {session.session_id} created: TTL {session.ttl:g}s, expires {_when(session.expires_at)}",
    )
    if not out.json:
        out.note(
            f"keep it alive with `lockbroker session keepalive {session.session_id}` (it lapses after "
            f"{session.ttl:g}s otherwise); close it with `lockbroker session close {session.session_id}`"
        )
    return EXIT_OK


async def cmd_session_keepalive(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    keeper = client.session(session_id=args.session_id)
    await keeper.start()
    # From now on a signal means "stop refreshing", not "abandon the call in flight".
    signals.handler = lambda _signo: None
    # Also with -o json (it goes to stderr): a script can wait for this line to know the
    # session is confirmed alive and being refreshed.
    out.note(
        f"keeping session {keeper.session_id} alive (TTL {keeper.ttl:g}s) until SIGINT/SIGTERM or the session is lost"
    )
    lost = asyncio.ensure_future(keeper.lost.wait())
    stop = asyncio.ensure_future(signals.event.wait())
    try:
        await asyncio.wait({lost, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        stop.cancel()
    data: dict[str, Any] = {"session_id": keeper.session_id, "ttl": _number(keeper.ttl)}
    if keeper.lost.is_set():
        reason = keeper.lost_reason or "the session was lost"
        await keeper.detach()
        out.note(f"session {keeper.session_id} lost: {reason}")
        out.result({**data, "stopped": "lost", "reason": reason}, None)
        return EXIT_LOST
    await keeper.detach()
    signo = signals.first
    sig_name = signal.Signals(signo).name if signo is not None else ""
    out.note(
        f"stopped keeping session {keeper.session_id} alive ({sig_name}); it lapses within "
        f"{keeper.ttl:g}s unless closed or refreshed elsewhere"
    )
    out.result({**data, "stopped": "signal", "signal": sig_name}, None)
    return EXIT_OK


async def cmd_session_close(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    closed = await client.close_session(args.session_id)
    data = {"session_id": args.session_id, "closed": closed}
    if closed:
        out.result(data, f"session {args.session_id} closed; its locks are released")
        return EXIT_OK
    out.result(data, None)
    out.note(f"session {args.session_id} was already closed or expired")
    return EXIT_NOT_FOUND


def add_session_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    sess = subparsers.add_parser(
        "session",
        help="create, keep alive or close a session",
        description="Sessions for scripts: `session create`, then `session keepalive ID &`, then "
        "`acquire --session ID` (any number of locks), and finally `session close ID`.",
    )
    sess_sub = sess.add_subparsers(dest="session_action", required=True, metavar="ACTION")
    create = add_command(
        sess_sub,
        "create",
        cmd_session_create,
        "create a session (nothing refreshes it)",
        common,
        label="session create",
    )
    create.add_argument("--ttl", type=_positive, help="whole seconds (default: broker's)")
    create.add_argument("--owner", help="owner label (default user@host)")
    create.add_argument("--request-id", help="idempotency key")
    keep = add_command(
        sess_sub,
        "keepalive",
        cmd_session_keepalive,
        "keep a session alive until SIGINT/SIGTERM (exit 0) or until it is lost (exit 3)",
        common,
        label="session keepalive",
    )
    keep.add_argument("session_id", metavar="ID")
    close = add_command(
        sess_sub, "close", cmd_session_close, "close a session, releasing all its locks", common, label="session close"
    )
    close.add_argument("session_id", metavar="ID")

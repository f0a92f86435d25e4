"""`lockbroker acquire`, `release`, `describe` and `list`: one call each on a lock."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    Output,
    _positive,
    _when,
    add_mode_arguments,
    default_owner,
    duration_arg,
    grant_json,
    holder_json,
    state_json,
)
from lockbroker.client.cli._runner import Signals, add_command
from lockbroker.client.types import LockState, LockSummary


async def cmd_acquire(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    owner = args.owner if args.owner is not None else default_owner()
    grant = await client.acquire(
        args.name,
        session_id=args.session,
        ttl=args.ttl,
        wait=args.wait,
        owner=owner,
        request_id=args.request_id,
        shared=args.shared,
        limit=args.permits or 0,
    )
    out.result(
        {**grant_json(grant), "own_session": not args.session},
        f"acquired {grant.name}: fencing token {grant.fencing_token}, session {grant.session_id}, "
        f"expires {_when(grant.expires_at)}",
    )
    if not args.session:
        # Nothing refreshes the one-lock session the broker made once this command exits.
        out.note(
            f"nothing keeps {grant.name} alive: it is released when its session {grant.session_id} expires "
            f"({_when(grant.expires_at)}), unless `lockbroker session keepalive {grant.session_id}` runs; "
            f"release it early with `lockbroker release {grant.name} --token {grant.fencing_token}`. "
            "To hold a lock while a command runs, use `lockbroker run`."
        )
    return EXIT_OK


async def cmd_release(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    released = await client.release(args.name, args.token, session_id=args.session, request_id=args.request_id)
    data = {"name": args.name, "fencing_token": args.token, "released": released}
    if released:
        out.result(data, f"released {args.name} (fencing token {args.token})")
        return EXIT_OK
    out.result(data, None)
    out.note(f"{args.name} was not held with fencing token {args.token}: already released, or its session expired")
    return EXIT_NOT_FOUND


def describe_text(s: LockState) -> str:
    if s.holder is None:
        lines = [f"{s.name}: not held"]
    else:
        h = s.holder
        lines = [
            f"{s.name}: held by {h.owner!r}" if h.owner else f"{s.name}: held",
            f"  fencing token  {h.fencing_token}",
            f"  session        {h.session_id}",
            f"  since          {_when(h.since)}",
            f"  expires        {_when(h.expires_at)}",
        ]
    lines.append(f"  waiters        {len(s.waiters)}")
    lines.extend(f"    {w.position}. {w.owner!r} session {w.session_id}, waiting {w.waited:.1f}s" for w in s.waiters)
    return "\n".join(lines)


async def cmd_describe(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    state = await client.describe(args.name)
    out.result(state_json(state), describe_text(state))
    return EXIT_OK


def list_text(locks: Sequence[LockSummary], truncated: bool) -> str:
    if not locks:
        return "no locks held"
    rows = [("NAME", "TOKEN", "OWNER", "SESSION", "SINCE", "WAITERS")]
    rows += [
        (
            s.name,
            str(s.holder.fencing_token),
            s.holder.owner,
            s.holder.session_id,
            _when(s.holder.since),
            f"{s.waiters}",
        )
        for s in locks
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
    if truncated:
        lines.append(f"(first {len(locks)} shown; raise --limit for more)")
    return "\n".join(lines)


async def cmd_list(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    limit: int | None = args.limit
    locks: list[LockSummary] = []
    truncated = False
    page_size = min(limit + 1, 1000) if limit is not None else 1000
    async with contextlib.aclosing(client.list(args.prefix, page_size)) as items:
        async for item in items:
            if limit is not None and len(locks) >= limit:
                truncated = True
                break
            locks.append(item)
    data = {
        "locks": [{"name": s.name, "holder": holder_json(s.holder), "waiters": s.waiters} for s in locks],
        "count": len(locks),
        "truncated": truncated,
    }
    out.result(data, list_text(locks, truncated))
    return EXIT_OK


def add_lock_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    acq = add_command(
        subparsers,
        "acquire",
        cmd_acquire,
        "take a lock and print its fencing token",
        common,
        description="Take a lock. With --session it joins a session kept alive elsewhere (`session "
        "create` + `session keepalive`); without, the broker makes a one-lock session that lapses "
        "after --ttl because nothing refreshes it once this command exits. To hold a lock while "
        "a command runs, use `lockbroker run`.",
    )
    acq.add_argument("name", help="lock name, e.g. orders/42")
    acq.add_argument("--ttl", type=_positive, help="TTL of the one-lock session (whole seconds; default: broker's)")
    acq.add_argument("--wait", type=duration_arg, default=0.0, help="queue up to this long (default 0: try once)")
    acq.add_argument("--owner", help="owner label shown by describe/list (default user@host)")
    acq.add_argument("--session", metavar="ID", help="acquire on this session (from `session create`)")
    acq.add_argument("--request-id", help="idempotency key: a retry with the same id gets the same grant")
    add_mode_arguments(acq)

    rel = add_command(subparsers, "release", cmd_release, "release a lock by its fencing token", common)
    rel.add_argument("name")
    rel.add_argument("--token", type=int, required=True, help="fencing token printed by acquire")
    rel.add_argument("--session", metavar="ID", help="the session that holds it")
    rel.add_argument("--request-id", help="idempotency key")

    desc = add_command(subparsers, "describe", cmd_describe, "show a lock's holder and waiters", common)
    desc.add_argument("name")

    lst = add_command(subparsers, "list", cmd_list, "list held locks", common)
    lst.add_argument("--prefix", default="", help="only names starting with this")
    lst.add_argument("--limit", type=int, help="show at most this many")

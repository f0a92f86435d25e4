"""`lockbroker admin force-release|revoke-session|list-sessions`: the operators' commands.

They need an API key (or certificate) of a tenant with the admin role; anyone else gets exit 77.
"""

from __future__ import annotations

import argparse
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import EXIT_NOT_FOUND, EXIT_OK, Output, _iso, _number
from lockbroker.client.cli._runner import Signals, add_command
from lockbroker.client.types import SessionSummary


async def cmd_force_release(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    done = await client.admin.force_release(args.name, reason=args.reason, tenant=args.tenant)
    data = {
        "name": args.name,
        "released": done.released,
        "fencing_token": str(done.fencing_token),
        "session_id": done.session_id,
    }
    if not done.released:
        out.result(data, None)
        out.note(f"lock {args.name!r} is free: nothing to release")
        return EXIT_NOT_FOUND
    out.result(
        data,
        f"released {args.name!r} (fencing token {done.fencing_token}) from session {done.session_id}; "
        "its holder is told REVOKED on its next keepalive",
    )
    return EXIT_OK


async def cmd_revoke_session(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    revoked = await client.admin.revoke_session(args.session_id, reason=args.reason, tenant=args.tenant)
    data = {"session_id": args.session_id, "revoked": revoked}
    if not revoked:
        out.result(data, None)
        out.note(f"session {args.session_id} was already gone")
        return EXIT_NOT_FOUND
    out.result(data, f"session {args.session_id} revoked; its locks are released")
    return EXIT_OK


def _session_json(s: SessionSummary) -> dict[str, Any]:
    return {
        "session_id": s.session_id,
        "owner": s.owner,
        "principal": s.principal,
        "ttl": _number(s.ttl),
        "expires_at": _iso(s.expires_at),
        "last_keepalive": _iso(s.last_keepalive),
        "held": [{"name": n, "fencing_token": str(t)} for n, t in s.held],
        "waiting": list(s.waiting),
    }


def _session_text(s: SessionSummary) -> str:
    held = ", ".join(f"{n}@{t}" for n, t in s.held) or "-"
    waiting = ", ".join(s.waiting) or "-"
    return (
        f"{s.session_id}  owner={s.owner or '-'}  ttl={s.ttl:g}s  last_keepalive={_iso(s.last_keepalive) or '-'}  "
        f"held={held}  waiting={waiting}"
    )


async def cmd_list_sessions(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    sessions = [s async for s in client.admin.list_sessions(args.tenant, args.page_size)]
    text = "\n".join(_session_text(s) for s in sessions) or "(no sessions)"
    out.result({"sessions": [_session_json(s) for s in sessions]}, text)
    return EXIT_OK


def add_admin_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    adm = subparsers.add_parser(
        "admin",
        help="operators: force-release a lock, revoke a session, list sessions (needs the admin role)",
        description="The AdminService calls. Each change needs --reason, which the holder is shown and "
        "the audit log records. --tenant names another tenant (default: your own).",
    )
    sub = adm.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    force = add_command(
        sub,
        "force-release",
        cmd_force_release,
        "take a lock away from its holder (the next grant's token is greater)",
        common,
        label="admin force-release",
    )
    force.add_argument("name", metavar="NAME")
    revoke = add_command(
        sub,
        "revoke-session",
        cmd_revoke_session,
        "end a session and release its locks",
        common,
        label="admin revoke-session",
    )
    revoke.add_argument("session_id", metavar="ID")
    for p in (force, revoke):
        p.add_argument("--reason", required=True, help="why (shown to the holder, kept in the audit log)")
    lst = add_command(
        sub,
        "list-sessions",
        cmd_list_sessions,
        "list a tenant's sessions with their locks",
        common,
        label="admin list-sessions",
    )
    lst.add_argument("--page-size", type=int, default=100, help="sessions per call (default 100)")
    for p in (force, revoke, lst):
        p.add_argument("--tenant", default="", help="the tenant (default: the caller's own)")

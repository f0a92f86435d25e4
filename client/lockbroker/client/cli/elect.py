"""`lockbroker elect`: run a command while leading an election (like `lockbroker run` for a lock).

Campaign for NAME (waiting in line, FIFO, until this candidate leads), start the command once
leader, stop it (SIGTERM, then SIGKILL after --grace) if leadership is lost, and resign when it
exits. Everything but the campaign is `lockbroker run`'s (run.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lockbroker.client.aio import Client
from lockbroker.client.cli._common import (
    DEFAULT_GRACE,
    EXIT_LOST,
    EXIT_NOT_ACQUIRED,
    Output,
    _exit_code_arg,
    _positive,
    duration_arg,
)
from lockbroker.client.cli._runner import Signals, add_command
from lockbroker.client.cli.run import _Run


class _Elect(_Run):
    def __init__(self, client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> None:
        super().__init__(client, args, out, signals, campaign=True)


async def cmd_elect(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    return await _Elect(client, args, out, signals)()


def add_elect_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    elect = add_command(
        subparsers,
        "elect",
        cmd_elect,
        "run a command while leading an election",
        common,
        stream=lambda: sys.stderr,
        usage="lockbroker elect NAME [--value V] [--ttl S] [--wait S] [--grace S] [options] -- CMD [ARGS...]",
        description="Campaign for leadership of election NAME (ElectionService; FIFO among candidates) and "
        "run CMD while leader. The command starts only once this candidate leads, and gets "
        "LOCKBROKER_FENCING_TOKEN (the leadership's token), LOCKBROKER_LOCK_NAME (the election) and "
        "LOCKBROKER_SESSION_ID. If leadership is lost the command gets SIGTERM, then SIGKILL after --grace; "
        "when it exits the candidate resigns and the next one leads. Signals and -o json as `lockbroker run`.",
    )
    elect.add_argument("name")
    elect.add_argument("cmd", nargs="*", metavar="CMD", help="the command and its arguments, after --")
    elect.add_argument(
        "--value", default=None, help="the value observers see while this candidate leads (default: the owner label)"
    )
    elect.add_argument("--ttl", type=_positive, help="session TTL in whole seconds (default: broker's)")
    elect.add_argument(
        "--wait", type=duration_arg, default=None, help="campaign at most this long (default: until leader)"
    )
    elect.add_argument(
        "--grace", type=duration_arg, default=DEFAULT_GRACE, help="SIGTERM to SIGKILL delay on lost leadership"
    )
    elect.add_argument("--owner", help="owner label (default user@host pid N)")
    elect.add_argument(
        "--conflict-exit-code",
        type=_exit_code_arg,
        default=EXIT_NOT_ACQUIRED,
        metavar="N",
        help="exit code when leadership is not won within --wait (default 1)",
    )
    elect.add_argument(
        "--lost-exit-code",
        type=_exit_code_arg,
        default=EXIT_LOST,
        metavar="N",
        help="exit code when leadership is lost while the command runs (default 3)",
    )


__all__ = ["add_elect_command", "cmd_elect"]

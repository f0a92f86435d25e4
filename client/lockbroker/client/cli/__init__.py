"""The client side of the `lockbroker` command: acquire, release, describe, list, session, run.

Built only on lockbroker.client, so the standalone `lockbroker-client` distribution ships it
as its `lockbroker` command; the full package adds these subcommands beside `serve` and
`tenants`. Exit codes are listed in EPILOG (and in docs/cli.md).

One module per command group, as etcdctl has one file per command: lock.py (acquire, release,
describe, list), fence.py (check-fence), session.py, run.py, elect.py, admin.py (admin ...), watch.py; _common.py
holds exit codes, values and output shapes, and _runner.py connects, handles signals and registers commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

from lockbroker.client.cli._common import EPILOG, EXIT_USAGE, SERVER_COMMANDS
from lockbroker.client.cli._runner import common_parser
from lockbroker.client.cli.admin import add_admin_commands
from lockbroker.client.cli.elect import add_elect_command
from lockbroker.client.cli.fence import add_fence_command
from lockbroker.client.cli.lock import add_lock_commands
from lockbroker.client.cli.run import add_run_command
from lockbroker.client.cli.session import add_session_commands
from lockbroker.client.cli.watch import add_watch_command


def add_commands(subparsers: Any) -> None:
    """Register the client subcommands on an argparse subparsers action (`serve`'s parser uses this)."""
    common = common_parser()
    add_lock_commands(subparsers, common)
    add_fence_command(subparsers, common)
    add_session_commands(subparsers, common)
    add_run_command(subparsers, common)
    add_elect_command(subparsers, common)
    add_admin_commands(subparsers, common)
    add_watch_command(subparsers, common)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, except that for `run` everything after the first `--` is the command.

    argparse alone cannot do this: a `*` positional after NAME matches nothing once options
    follow NAME, and REMAINDER would swallow `run`'s own options.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] | None = None
    if args_list[:1] in (["run"], ["elect"]) and "--" in args_list:
        i = args_list.index("--")
        args_list, tail = args_list[:i], args_list[i + 1 :]
    args = parser.parse_args(args_list)
    if tail is not None:
        if args.cmd:
            parser.error(f"{args_list[0]}: give the command after --, not before it")
        args.cmd = tail
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockbroker",
        description="Fair, fenced distributed locks over gRPC: the client commands.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    for name in SERVER_COMMANDS:
        # Listed so that `lockbroker --help` does not pretend they never existed; main() answers them.
        sub.add_parser(name, help="(needs the full lockbroker package)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] and args_list[0] in SERVER_COMMANDS:
        # Found without importing it: this module must work where the server is not installed.
        if importlib.util.find_spec("lockbroker.server") is not None:
            hint = f"run `lockbroker {args_list[0]}` from the full package (python -m lockbroker.server.cli)"
        else:
            hint = "install the full `lockbroker` package; this one (lockbroker-client) has only the client"
        print(f"lockbroker: `{args_list[0]}` is not a client command: {hint}", file=sys.stderr)
        return EXIT_USAGE
    args = parse_args(build_parser(), args_list)
    return int(args.func(args))


__all__ = ["EPILOG", "SERVER_COMMANDS", "add_commands", "build_parser", "main", "parse_args"]

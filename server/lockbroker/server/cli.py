"""The `lockbroker` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from lockbroker.server import config, logs
from lockbroker.server.app import Broker
from lockbroker.server.embedded import EtcdNotFoundError, EtcdStartError

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args, os.environ)
    except config.ConfigError as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(cfg.server.log_level)
    try:
        asyncio.run(Broker(cfg).run_until_signal())
    except config.ConfigError as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (EtcdNotFoundError, EtcdStartError) as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockbroker", description="Fair, fenced distributed locks over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run a broker (with no --etcd-endpoints: on a private embedded etcd)",
        description="Run a broker. Settings come from flags, LOCKBROKER_* variables and "
        "--config FILE, in that order of precedence.",
    )
    config.add_arguments(serve)
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

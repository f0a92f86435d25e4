"""The `lockbroker` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

from lockbroker.client import cli as client_cli
from lockbroker.server import config, logs

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE


def _serve(args: argparse.Namespace) -> int:
    # Imported here, not at the top: the client subcommands should not pay for the server's imports.
    from lockbroker.server.embedded import EtcdNotFoundError, EtcdStartError  # noqa: PLC0415
    from lockbroker.server.lifecycle import EtcdGaveUpError  # noqa: PLC0415
    from lockbroker.server.workers import WorkerSpec, run_parent  # noqa: PLC0415

    worker = WorkerSpec.from_env(os.environ)  # set by the parent of `serve --workers N`
    try:
        cfg = config.load(args, os.environ)
        config.check_files(cfg)
    except config.ConfigError as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(cfg.server.log_level)
    try:
        if worker is None and cfg.server.workers > 1:
            # The parent: it never imports the broker, its workers do (each its own process).
            return run_parent(getattr(args, "argv", sys.argv[1:]), cfg, reload=lambda: _reload(args))
        from lockbroker.server import lifecycle, loops  # noqa: PLC0415
        from lockbroker.server.app import Broker  # noqa: PLC0415

        if worker is not None:
            worker.become()
            cfg = worker.apply(cfg)
        broker = Broker(cfg, shared_port=worker is not None)
        reload = (lambda: _reload(args)) if worker is None else (lambda: worker.apply(_reload(args)))
        on_ready = worker.ready if worker else None
        loops.run(lambda: lifecycle.run_until_signal(broker, reload, on_ready=on_ready), cfg.server.event_loop)
    except config.ConfigError as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (EtcdNotFoundError, EtcdStartError, EtcdGaveUpError) as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def _reload(args: argparse.Namespace) -> config.Config:
    """SIGHUP: the same flags, the environment we started with, and the TOML file as it is now."""
    cfg = config.load(args, os.environ)
    config.check_files(cfg)
    return cfg


def _tenants(args: argparse.Namespace) -> int:
    from lockbroker.server.auth import tenants  # noqa: PLC0415

    path = args.file or os.environ.get("LOCKBROKER_AUTH_TENANTS_FILE")
    if not path:
        print("lockbroker: name the tenants file with --file or LOCKBROKER_AUTH_TENANTS_FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.action in ("add", "add-key"):
            if args.action == "add":
                key = tenants.add_tenant(path, args.name, admin=args.admin)
            else:
                key = tenants.add_key(path, args.name)
            parsed = tenants.parse_key(key)
            key_id = parsed[0] if parsed else "?"
            # The key goes alone to stdout (KEY=$(lockbroker tenants add acme)); it is never stored.
            print(key)
            print(f"tenant {args.name}: new API key {key_id}; it is shown only this once", file=sys.stderr)
        elif args.action == "remove-key":
            owner = tenants.remove_key(path, args.key_id)
            print(
                f"removed key {args.key_id} of tenant {owner}; running brokers accept it until restarted",
                file=sys.stderr,
            )
        else:
            tenants.add_mtls_identity(path, args.name, args.identity)
            print(f"tenant {args.name}: certificate identity {args.identity} added", file=sys.stderr)
    except tenants.TenantsFileError as e:
        print(f"lockbroker: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("lockbroker")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockbroker",
        description="Fair, fenced distributed locks over gRPC.",
        epilog=client_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lockbroker {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run a broker (with no --etcd-endpoints: on a private embedded etcd)",
        description="Run a broker. Settings come from flags, LOCKBROKER_* variables and "
        "--config FILE, in that order of precedence.",
    )
    config.add_arguments(serve)
    serve.set_defaults(func=_serve)

    ten = sub.add_parser("tenants", help="manage the tenants file (API keys, mTLS identities)")
    ten_sub = ten.add_subparsers(dest="action", required=True)
    file_help = "tenants file (default: $LOCKBROKER_AUTH_TENANTS_FILE)"
    add = ten_sub.add_parser("add", help="add a tenant and print its first API key (shown once)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may act across tenants")
    add_key = ten_sub.add_parser("add-key", help="add another API key to a tenant (for rotation)")
    add_key.add_argument("name")
    remove = ten_sub.add_parser("remove-key", help="remove an API key by its id")
    remove.add_argument("key_id")
    ident = ten_sub.add_parser("add-identity", help="map a client certificate (SPIFFE ID or CN=...) to a tenant")
    ident.add_argument("name")
    ident.add_argument("identity")
    for p in (add, add_key, remove, ident):
        p.add_argument("--file", help=file_help)
        p.set_defaults(func=_tenants)
    client_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = client_cli.parse_args(build_parser(), argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `serve --workers N` gives its workers
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

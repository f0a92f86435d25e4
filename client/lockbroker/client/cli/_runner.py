"""Running one client command: the connection flags turned into a Client, signals turned into
cancellation, errors into exit codes, and the argparse plumbing every command is registered with.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from lockbroker.client._clear import InsecureApiKeyWarning
from lockbroker.client.aio import Client
from lockbroker.client.cli._common import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    EPILOG,
    EXIT_SIGNAL_BASE,
    Output,
    UsageError,
    _positive,
    log,
)
from lockbroker.client.errors import LockBrokerError

# -- connection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    target: str
    credentials: grpc.ChannelCredentials | None
    api_key: str | None
    timeout: float


def _env(name: str) -> str | None:
    # An empty variable is unset, as for `lockbroker serve`.
    return os.environ.get(name) or None


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read {flag} {path}: {e.strerror}") from None


def connection_of(args: argparse.Namespace) -> Connection:
    target = args.target or _env("LOCKBROKER_TARGET") or DEFAULT_TARGET
    api_key = args.api_key or _env("LOCKBROKER_API_KEY")
    # Checked here because gRPC would reject it later with a message that is no better; the
    # key itself is never printed.
    if api_key is not None and not all(" " < ch <= "~" for ch in api_key):
        raise UsageError("the API key has characters an x-api-key header cannot carry (spaces or non-ASCII)")
    ca = args.ca_file or _env("LOCKBROKER_CA_FILE")
    cert = args.cert_file or _env("LOCKBROKER_CERT_FILE")
    key = args.key_file or _env("LOCKBROKER_KEY_FILE")
    credentials = None
    if args.tls or ca or cert or key:
        if bool(cert) != bool(key):
            raise UsageError("--cert-file and --key-file go together (a client certificate needs its key)")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "--ca-file") if ca else None,
            private_key=_read(key, "--key-file") if key else None,
            certificate_chain=_read(cert, "--cert-file") if cert else None,
        )
    return Connection(target, credentials, api_key, args.timeout)


def _connect(conn: Connection) -> Client:
    # The client warns when an API key would cross the network in clear; the CLI says so in
    # one plain line on stderr (never on stdout: `-o json` output stays parseable).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InsecureApiKeyWarning)
        client = Client(conn.target, credentials=conn.credentials, api_key=conn.api_key, default_timeout=conn.timeout)
    for w in caught:
        if issubclass(w.category, InsecureApiKeyWarning):
            print(f"lockbroker: warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return client


# -- signals ---------------------------------------------------------------------------------------

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """SIGINT/SIGTERM/SIGHUP as asyncio callbacks. By default a signal cancels the command's task
    (so every `async with` cleans up: releases, closes, cancels a queued wait); commands that
    own a child or run until stopped set `handler` instead."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.received: list[int] = []
        self.event = asyncio.Event()
        self._task = task
        self.handler: Callable[[int], None] = self._cancel

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self._dispatch, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)

    @property
    def first(self) -> int | None:
        return self.received[0] if self.received else None

    def _dispatch(self, signo: int) -> None:
        self.received.append(signo)
        self.event.set()
        self.handler(signo)

    def _cancel(self, _signo: int) -> None:
        self._task.cancel()


Command = Callable[[Client, argparse.Namespace, Output, Signals], Awaitable[int]]


async def _main(fn: Command, conn: Connection, args: argparse.Namespace, out: Output) -> int:
    task = asyncio.current_task()
    assert task is not None
    signals = Signals(task)
    signals.install()
    try:
        async with _connect(conn) as client:
            try:
                return await fn(client, args, out, signals)
            except LockBrokerError as e:
                return out.fail(e)
            except asyncio.CancelledError:
                if signals.first is None:
                    raise
                # Our own cancellation, from a signal: the command's `async with` blocks have
                # cleaned up; uncancel so that closing the client below is not cut short.
                task.uncancel()
                return EXIT_SIGNAL_BASE + signals.first
    finally:
        signals.uninstall()


def _runner(fn: Command, stream: Callable[[], TextIO] = lambda: sys.stdout) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        out = Output(args.output == "json", stream=stream())
        try:
            _check(args)
            conn = connection_of(args)
            out.target = conn.target
            _setup_logging(args.verbose)
            return asyncio.run(_main(fn, conn, args, out))
        except UsageError as e:
            return out.usage(str(e), args.cli_command)
        except KeyboardInterrupt:  # before the loop's handlers were installed
            return EXIT_SIGNAL_BASE + signal.SIGINT

    return run


def _check(args: argparse.Namespace) -> None:
    """What argparse cannot say about combinations of flags, checked before connecting."""
    if args.cli_command == "acquire" and args.session and args.ttl is not None:
        raise UsageError("--ttl applies only without --session (a session has its own TTL)")
    if args.cli_command in ("run", "elect") and not args.cmd:
        raise UsageError(
            f"name the command to run after --: lockbroker {args.cli_command} NAME [options] -- CMD [ARGS...]"
        )


def _setup_logging(verbose: int) -> None:
    # The client logs lost sessions and failed clean-ups as warnings; the CLI reports those
    # itself in one line, so the library's own messages show only with -v.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lockbroker: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    # -v: warnings and one line per retry (INFO); -vv: debug.
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.CRITICAL)


# -- registering commands ----------------------------------------------------------------------------


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", help=f"broker host:port (env LOCKBROKER_TARGET; default {DEFAULT_TARGET})")
    g.add_argument(
        "--api-key",
        help="API key sent as x-api-key (env LOCKBROKER_API_KEY, preferred: other users can read flags in ps)",
    )
    g.add_argument("--tls", action="store_true", help="use TLS (implied by the three files below)")
    g.add_argument("--ca-file", help="CA bundle to verify the broker (env LOCKBROKER_CA_FILE; default: system CAs)")
    g.add_argument("--cert-file", help="client certificate for mTLS (env LOCKBROKER_CERT_FILE)")
    g.add_argument("--key-file", help="client certificate's key (env LOCKBROKER_KEY_FILE)")
    g.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT,
        help=f"deadline of each call, retries included, on top of --wait (default {DEFAULT_TIMEOUT:g}s)",
    )
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", choices=("human", "json"), default="human", help="json: one object for scripts")
    o.add_argument("-v", "--verbose", action="count", default=0, help="log warnings and retries (-vv: debug)")
    return p


def add_command(
    subparsers: Any, name: str, fn: Command, help_text: str, common: argparse.ArgumentParser, **kw: Any
) -> argparse.ArgumentParser:
    stream = kw.pop("stream", None)
    label = kw.pop("label", name)
    p: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=kw.pop("description", help_text[:1].upper() + help_text[1:] + "."),
        parents=[common],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    p.set_defaults(func=_runner(fn, stream) if stream is not None else _runner(fn), cli_command=label)
    return p

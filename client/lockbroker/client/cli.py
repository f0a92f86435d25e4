"""The client side of the `lockbroker` command: acquire, release, describe, list, session, run.

Built only on lockbroker.client, so the standalone `lockbroker-client` distribution ships it
as its `lockbroker` command; the full package adds these subcommands beside `serve` and
`tenants`. Exit codes are listed in EPILOG (and in docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import grpc

from lockbroker.client.aio import Client, HeldLock, LockContext
from lockbroker.client.errors import (
    AlreadyQueued,
    DeadlineExceeded,
    InvalidArgument,
    LockBrokerError,
    LockHeld,
    LockLost,
    NotAcquired,
    PermissionDenied,
    QuotaExceeded,
    RequestIdReused,
    SessionLost,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
    WaitExpired,
)
from lockbroker.client.types import Grant, Holder, LockState, LockSummary, Session

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 10.0
DEFAULT_GRACE = 5.0

EXIT_OK = 0
EXIT_NOT_ACQUIRED = 1
EXIT_USAGE = 2
EXIT_LOST = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE, as `lockbroker serve` uses it
EXIT_SOFTWARE = 70  # EX_SOFTWARE
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL
EXIT_NOPERM = 77  # EX_NOPERM
EXIT_CANNOT_EXECUTE = 126  # as shells report a command that cannot run ...
EXIT_COMMAND_NOT_FOUND = 127  # ... or does not exist
EXIT_SIGNAL_BASE = 128  # + signal number, as shells report a death by signal

EPILOG = """\
exit codes:
  0        success
  1        not acquired: the lock is held (LOCK_HELD) or the wait ran out (WAIT_EXPIRED)
  2        usage: bad flags, or the broker refused an argument (INVALID_ARGUMENT)
  3        lost: the lock or session was lost (run, session keepalive)
  4        not found: unknown, closed or expired session; release/close found nothing
  5        conflict: the session already holds or waits for the lock, or --request-id was reused
  69       unavailable: the broker could not be reached or did not answer in time
  70       internal error
  75       over quota: try again later
  77       not allowed: missing or wrong API key or certificate, or the call needs the admin role
  126/127  run: the command could not be executed / was not found
  128+N    stopped by signal N (130 SIGINT, 143 SIGTERM)
`run` exits with these codes only before its command starts (the command never ran); once it has
started, with the command's own exit code (128+N if a signal killed it), or with 3
(--lost-exit-code) if the lock was lost. --conflict-exit-code changes the 1 of "not acquired".
"""

# Commands that exist only in the full `lockbroker` package.
SERVER_COMMANDS = ("serve", "tenants")

log = logging.getLogger("lockbroker.client")


class UsageError(Exception):
    """Bad flags or arguments found after argparse (exit 2)."""


# -- values --------------------------------------------------------------------------------------

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration_arg(text: str) -> float:
    """Seconds from `10`, `1.5`, `500ms`, `30s`, `5m` or `1h`."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10, 1.5, 500ms, 30s, 5m, 1h)")
    return float(m["value"]) * _UNIT[m["unit"]]


def _positive(text: str) -> float:
    value = duration_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _exit_code_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an exit code") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("must be 0-255")
    return value


def _number(value: float) -> int | float:
    # TTLs are whole seconds: `30`, not `30.0`, in JSON.
    return int(value) if value == int(value) else value


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%SZ") if dt is not None else "-"


def default_owner(suffix: str = "") -> str:
    """`user@host`, so Describe and List show whose lock it is."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER variable and no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    owner = f"{user}@{socket.gethostname()}{suffix}"
    # The broker refuses owners over 128 bytes; a long host name must not make the CLI unusable.
    return owner.encode()[:128].decode(errors="ignore")


# -- JSON and human shapes -------------------------------------------------------------------------


def holder_json(h: Holder) -> dict[str, Any]:
    return {
        "owner": h.owner,
        "session_id": h.session_id,
        "fencing_token": h.fencing_token,
        "since": _iso(h.since),
        "expires_at": _iso(h.expires_at),
    }


def grant_json(g: Grant) -> dict[str, Any]:
    return {
        "name": g.name,
        "fencing_token": g.fencing_token,
        "session_id": g.session_id,
        "owner": g.owner,
        "request_id": g.request_id,
        "expires_at": _iso(g.expires_at),
        "queued_at": _iso(g.queued_at),
        "waited": round(g.waited, 3),
        "queue_position": g.queue_position,
    }


def state_json(s: LockState) -> dict[str, Any]:
    return {
        "name": s.name,
        "held": s.held,
        "holder": holder_json(s.holder) if s.holder is not None else None,
        "waiters": [
            {
                "position": w.position,
                "owner": w.owner,
                "session_id": w.session_id,
                "since": _iso(w.since),
                "waited": round(w.waited, 3),
            }
            for w in s.waiters
        ],
    }


def session_json(s: Session, owner: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"session_id": s.session_id, "ttl": _number(s.ttl), "expires_at": _iso(s.expires_at)}
    if owner is not None:
        out["owner"] = owner
    return out


def _holder_text(h: Holder) -> str:
    who = f"{h.owner!r}" if h.owner else "an unnamed owner"
    return f"{who} (session {h.session_id}, fencing token {h.fencing_token}, since {_when(h.since)})"


def exit_code_of(err: LockBrokerError) -> int:
    if isinstance(err, NotAcquired):
        return EXIT_NOT_ACQUIRED
    if isinstance(err, LockLost):
        return EXIT_LOST
    if isinstance(err, (SessionNotFound, SessionLost)) or err.code == grpc.StatusCode.NOT_FOUND:
        return EXIT_NOT_FOUND
    if isinstance(err, (AlreadyQueued, RequestIdReused)) or err.code == grpc.StatusCode.FAILED_PRECONDITION:
        return EXIT_CONFLICT
    if isinstance(err, InvalidArgument):
        return EXIT_USAGE
    if isinstance(err, (Unavailable, DeadlineExceeded)):
        return EXIT_UNAVAILABLE
    if isinstance(err, (Unauthenticated, PermissionDenied)):
        return EXIT_NOPERM
    if isinstance(err, QuotaExceeded):
        return EXIT_TEMPFAIL
    return EXIT_SOFTWARE


def error_text(err: LockBrokerError, target: str) -> str:
    """One line a person can act on; the holder of a held lock is always named."""
    if isinstance(err, NotAcquired):
        name = err.name or "the lock"
        holder = _holder_text(err.holder) if err.holder is not None else "another session"
        queue = f"; {err.waiters} waiting" if err.waiters else ""
        if isinstance(err, WaitExpired):
            return f"not acquired: gave up waiting for {name} after {err.waited:.1f}s, held by {holder}{queue}"
        if isinstance(err, LockHeld):
            return f"not acquired: {name} is held by {holder}{queue}"
        return f"not acquired: {name}: {err.message}"
    if isinstance(err, InvalidArgument) and err.field_violations:
        return "invalid argument: " + "; ".join(f"{f} {d}" for f, d in err.field_violations)
    if isinstance(err, (Unavailable, DeadlineExceeded)):
        return f"broker at {target} is unavailable: {err.message}"
    if isinstance(err, Unauthenticated):
        return f"not authenticated: {err.message} (check --api-key/LOCKBROKER_API_KEY or the client certificate)"
    if isinstance(err, AlreadyQueued):
        token = err.existing_fencing_token
        held = f" (it holds fencing token {token})" if token is not None else ""
        return f"conflict: this session already holds or waits for the lock{held}; locks are not reentrant"
    if isinstance(err, QuotaExceeded) and err.violations:
        return "over quota: " + "; ".join(f"{s}: {d}" for s, d in err.violations)
    return f"{err.message} ({err.reason or err.code.name})"


def error_json(err: LockBrokerError, code: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "code": err.code.name,
        "reason": err.reason,
        "message": err.message,
        "exit_code": code,
    }
    if isinstance(err, NotAcquired):
        out.update(
            name=err.name,
            holder=holder_json(err.holder) if err.holder is not None else None,
            waiters=err.waiters,
            waited=round(err.waited, 3),
        )
    elif isinstance(err, InvalidArgument):
        out["field_violations"] = [{"field": f, "description": d} for f, d in err.field_violations]
    elif isinstance(err, AlreadyQueued):
        out.update(existing_request_id=err.existing_request_id, existing_fencing_token=err.existing_fencing_token)
    elif isinstance(err, (Unavailable, QuotaExceeded)):
        out["retry_after"] = err.retry_after
    return out


class Output:
    """Results on `stream` (stdout, except for `run`, whose command owns stdout); notes and
    error lines always on stderr, so `-o json` leaves exactly one JSON object on `stream`."""

    def __init__(self, json_mode: bool, target: str = DEFAULT_TARGET, stream: TextIO | None = None) -> None:
        self.json = json_mode
        self.target = target
        self.stream = stream or sys.stdout

    def result(self, data: dict[str, Any], human: str | None) -> None:
        if self.json:
            print(json.dumps(data), file=self.stream, flush=True)
        elif human is not None:
            print(human, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"lockbroker: {text}", file=sys.stderr, flush=True)

    def fail(self, err: LockBrokerError) -> int:
        code = exit_code_of(err)
        self.note(error_text(err, self.target))
        if self.json:
            print(json.dumps({"error": error_json(err, code)}), file=self.stream, flush=True)
        return code

    def usage(self, message: str, command: str = "") -> int:
        prog = f"lockbroker {command}".strip()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        if self.json:
            err = {"code": "USAGE", "reason": "USAGE", "message": message, "exit_code": EXIT_USAGE}
            print(json.dumps({"error": err}), file=self.stream, flush=True)
        return EXIT_USAGE


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
    return Client(conn.target, credentials=conn.credentials, api_key=conn.api_key, default_timeout=conn.timeout)


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
    if args.cli_command == "run" and not args.cmd:
        raise UsageError("name the command to run after --: lockbroker run NAME [options] -- CMD [ARGS...]")


def _setup_logging(verbose: int) -> None:
    # The client logs lost sessions and failed clean-ups as warnings; the CLI reports those
    # itself in one line, so the library's own messages show only with -v.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lockbroker: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    # -v: warnings and one line per retry (INFO); -vv: debug.
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.CRITICAL)


# -- commands ----------------------------------------------------------------------------------------


async def cmd_acquire(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    owner = args.owner if args.owner is not None else default_owner()
    grant = await client.acquire(
        args.name,
        session_id=args.session,
        ttl=args.ttl,
        wait=args.wait,
        owner=owner,
        request_id=args.request_id,
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


# -- run ---------------------------------------------------------------------------------------------


def _interactive() -> bool:
    """Whether we are the terminal's foreground job: then Ctrl-C already reaches the child."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _exit_status(returncode: int) -> int:
    return EXIT_SIGNAL_BASE - returncode if returncode < 0 else returncode


class _Child:
    """The command run under the lock.

    Not interactive, it leads its own process group, so a signal (and above all the SIGKILL
    after a lost lock) reaches everything it started, not just the first process. At a
    terminal it stays in ours, so that it can still read the terminal and Ctrl-C reaches it
    directly (which is also why SIGINT is then not forwarded a second time).
    """

    def __init__(self, proc: asyncio.subprocess.Process, own_group: bool) -> None:
        self.proc = proc
        self.own_group = own_group

    def signal(self, signo: int, *, after_exit: bool = False) -> None:
        """Signal the child (its group, if it leads one). Once it has exited, only with
        `after_exit`: to kill what it left running in its group."""
        if self.proc.returncode is not None and not (after_exit and self.own_group):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_group:
                os.killpg(self.proc.pid, signo)
            else:
                self.proc.send_signal(signo)


async def _start_child(cmd: Sequence[str], env: dict[str, str], own_group: bool) -> _Child:
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, process_group=0 if own_group else None)
    return _Child(proc, own_group)


async def _supervise(child: _Child, held: HeldLock, grace: float) -> tuple[int, str | None]:
    """Wait for the child; if the lock is lost first, SIGTERM it, then SIGKILL after `grace`.

    Returns the child's exit status and, if the lock was lost, why.
    """
    exited = asyncio.ensure_future(child.proc.wait())
    lost = asyncio.ensure_future(held.lost.wait())
    try:
        while not exited.done():
            try:
                held.check()  # also marks the lock lost once its last confirmed expiry has passed
            except LockLost:
                break
            await asyncio.wait({exited, lost}, timeout=max(held.remaining, 0.05), return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            return _exit_status(exited.result()), None
        reason = held.lost_reason or "the session's last confirmed expiry has passed"
        print(
            f"lockbroker: lock {held.name} lost ({reason}): stopping the command (SIGTERM, SIGKILL after {grace:g}s)",
            file=sys.stderr,
            flush=True,
        )
        child.signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), grace)
        # Also after a clean exit within the grace: nothing the command left behind in its
        # process group may go on working without the lock.
        child.signal(signal.SIGKILL, after_exit=True)
        return _exit_status(await exited), reason
    finally:
        lost.cancel()
        if not exited.done():
            exited.cancel()


class _Run:
    """One `lockbroker run`: acquire, start the command, watch it and the lock, release."""

    def __init__(self, client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> None:
        self.args = args
        self.out = out
        self.signals = signals
        self.cmd: list[str] = args.cmd
        self.interactive = _interactive()
        self.summary: dict[str, Any] = {"name": args.name, "command": self.cmd, "child_started": False}
        owner = args.owner if args.owner is not None else default_owner(f" pid {os.getpid()}")
        self.ctx = client.lock(args.name, ttl=args.ttl, wait=args.wait, owner=owner)
        self.acquiring: asyncio.Future[HeldLock] | None = None
        self.child: _Child | None = None

    def report(self, code: int) -> int:
        self.out.result({**self.summary, "exit_code": code}, None)
        return code

    def on_signal(self, signo: int) -> None:
        if self.child is not None:
            if not (signo == signal.SIGINT and self.interactive):
                self.child.signal(signo)
        elif self.acquiring is not None and not self.acquiring.done():
            self.acquiring.cancel()  # LockContext undoes whatever the broker queued or granted

    def failed(self, err: LockBrokerError, code: int) -> int:
        self.out.note(error_text(err, self.out.target))
        self.summary["error"] = error_json(err, code)
        return self.report(code)

    async def __call__(self) -> int:
        self.acquiring = asyncio.ensure_future(self.ctx.__aenter__())
        self.signals.handler = self.on_signal
        try:
            held = await self.acquiring
        except asyncio.CancelledError:
            if self.signals.first is None:
                raise
            return self.report(EXIT_SIGNAL_BASE + self.signals.first)
        except NotAcquired as e:
            return self.failed(e, self.args.conflict_exit_code)
        except LockBrokerError as e:
            return self.failed(e, exit_code_of(e))
        self.summary.update(fencing_token=held.fencing_token, session_id=held.session_id)
        code = EXIT_SOFTWARE
        try:
            code = await self.hold(held)
        except LockLost as e:
            self.out.note(str(e))
            self.summary["lost"] = held.lost_reason
            code = self.args.lost_exit_code
        finally:
            await _release(self.ctx, self.out)
            self.report(code)
        return code

    async def hold(self, held: HeldLock) -> int:
        held.check()
        if self.signals.first is not None:  # arrived while the lock was being granted
            return EXIT_SIGNAL_BASE + self.signals.first
        env = dict(os.environ)
        env.update(
            LOCKBROKER_FENCING_TOKEN=str(held.fencing_token),
            LOCKBROKER_LOCK_NAME=held.name,
            LOCKBROKER_SESSION_ID=held.session_id,
        )
        seen = len(self.signals.received)
        try:
            self.child = await _start_child(self.cmd, env, own_group=not self.interactive)
        except FileNotFoundError:
            self.out.note(f"{self.cmd[0]}: command not found")
            return EXIT_COMMAND_NOT_FOUND
        except OSError as e:
            self.out.note(f"{self.cmd[0]}: cannot execute: {e.strerror}")
            return EXIT_CANNOT_EXECUTE
        self.summary.update(child_started=True, pid=self.child.proc.pid)
        for signo in self.signals.received[seen:]:  # arrived while the child was being started
            self.on_signal(signo)
        status, lost_reason = await _supervise(self.child, held, self.args.grace)
        self.summary["child_exit_code"] = status
        if lost_reason is None:
            return status
        self.summary["lost"] = lost_reason
        return int(self.args.lost_exit_code)


async def cmd_run(client: Client, args: argparse.Namespace, out: Output, signals: Signals) -> int:
    return await _Run(client, args, out, signals)()


async def _release(ctx: LockContext, out: Output) -> None:
    try:
        await ctx.__aexit__(None, None, None)
    except LockBrokerError as e:
        out.note(f"could not release {ctx.held.name if ctx.held else 'the lock'}: {e}; it lapses with its session")


# -- parser --------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
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


def _sub(
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


def add_commands(subparsers: Any) -> None:
    """Register the client subcommands on an argparse subparsers action (`serve`'s parser uses this)."""
    common = _common()

    acq = _sub(
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

    rel = _sub(subparsers, "release", cmd_release, "release a lock by its fencing token", common)
    rel.add_argument("name")
    rel.add_argument("--token", type=int, required=True, help="fencing token printed by acquire")
    rel.add_argument("--session", metavar="ID", help="the session that holds it")
    rel.add_argument("--request-id", help="idempotency key")

    desc = _sub(subparsers, "describe", cmd_describe, "show a lock's holder and waiters", common)
    desc.add_argument("name")

    lst = _sub(subparsers, "list", cmd_list, "list held locks", common)
    lst.add_argument("--prefix", default="", help="only names starting with this")
    lst.add_argument("--limit", type=int, help="show at most this many")

    sess = subparsers.add_parser(
        "session",
        help="create, keep alive or close a session",
        description="Sessions for scripts: `session create`, then `session keepalive ID &`, then "
        "`acquire --session ID` (any number of locks), and finally `session close ID`.",
    )
    sess_sub = sess.add_subparsers(dest="session_action", required=True, metavar="ACTION")
    create = _sub(
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
    keep = _sub(
        sess_sub,
        "keepalive",
        cmd_session_keepalive,
        "keep a session alive until SIGINT/SIGTERM (exit 0) or until it is lost (exit 3)",
        common,
        label="session keepalive",
    )
    keep.add_argument("session_id", metavar="ID")
    close = _sub(
        sess_sub, "close", cmd_session_close, "close a session, releasing all its locks", common, label="session close"
    )
    close.add_argument("session_id", metavar="ID")

    run = _sub(
        subparsers,
        "run",
        cmd_run,
        "run a command while holding a lock",
        common,
        stream=lambda: sys.stderr,
        usage="lockbroker run NAME [--ttl S] [--wait S] [--grace S] [options] -- CMD [ARGS...]",
        description="Hold NAME while CMD runs (like flock, etcdctl lock, consul lock). The command "
        "starts only once the lock is held, and gets LOCKBROKER_FENCING_TOKEN, LOCKBROKER_LOCK_NAME "
        "and LOCKBROKER_SESSION_ID. The session is kept alive meanwhile; if the lock is lost the "
        "command gets SIGTERM, then SIGKILL after --grace. SIGTERM, SIGINT and SIGHUP are forwarded "
        "to it; the lock is released when it exits. -o json writes its summary to stderr: stdout "
        "belongs to the command.",
    )
    run.add_argument("name")
    run.add_argument("cmd", nargs="*", metavar="CMD", help="the command and its arguments, after --")
    run.add_argument("--ttl", type=_positive, help="session TTL in whole seconds (default: broker's)")
    run.add_argument("--wait", type=duration_arg, default=0.0, help="queue up to this long (default 0: try once)")
    run.add_argument(
        "--grace", type=duration_arg, default=DEFAULT_GRACE, help="SIGTERM to SIGKILL delay on a lost lock"
    )
    run.add_argument("--owner", help="owner label (default user@host pid N)")
    run.add_argument(
        "--conflict-exit-code",
        type=_exit_code_arg,
        default=EXIT_NOT_ACQUIRED,
        metavar="N",
        help="exit code when the lock is not acquired (default 1; like flock -E)",
    )
    run.add_argument(
        "--lost-exit-code",
        type=_exit_code_arg,
        default=EXIT_LOST,
        metavar="N",
        help="exit code when the lock is lost while the command runs (default 3)",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """parser.parse_args, except that for `run` everything after the first `--` is the command.

    argparse alone cannot do this: a `*` positional after NAME matches nothing once options
    follow NAME, and REMAINDER would swallow `run`'s own options.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] | None = None
    if args_list[:1] == ["run"] and "--" in args_list:
        i = args_list.index("--")
        args_list, tail = args_list[:i], args_list[i + 1 :]
    args = parser.parse_args(args_list)
    if tail is not None:
        if args.cmd:
            parser.error("run: give the command after --, not before it")
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


if __name__ == "__main__":
    raise SystemExit(main())

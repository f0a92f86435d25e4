"""What every client command shares: exit codes, argument values, the JSON and human shapes of
results and errors, and Output (which stream gets what).

Exit codes are listed in EPILOG (and in docs/cli.md).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import socket
import sys
from datetime import datetime
from typing import Any, TextIO

import grpc

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
from lockbroker.client.types import Grant, Holder, LockState, Session

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
  1        not acquired: the lock is held (LOCK_HELD) or the wait ran out (WAIT_EXPIRED);
           check-fence: the token is STALE
  2        usage: bad flags, or the broker refused an argument (INVALID_ARGUMENT)
  3        lost: the lock or session was lost (run, session keepalive)
  4        not found: unknown, closed or expired session; release/close/admin found nothing
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


def add_mode_arguments(p: argparse.ArgumentParser) -> None:
    """--shared and --permits (issue 17), for acquire and run."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shared", action="store_true", help="a shared (read) lock: held together with other readers")
    mode.add_argument(
        "--permits",
        type=int,
        metavar="N",
        help="take one of N permits of the semaphore NAME (like consul lock -n); every user names the same N",
    )

"""Histories of client operations, one JSON object per line, for the checker (tests/fault/checker.py).

Every client operation is two events with the same `id`: an `invoke` when the client sends it and
a completion when the client learns its outcome:

    ok     it happened (with what it returned: fencing token, released, ttl, ...)
    fail   it definitely did not happen (ABORTED LOCK_HELD, NOT_FOUND, ...)
    info   the client cannot know (UNAVAILABLE, its own deadline, cancelled, the process died)

An invoke without a completion (the process was killed) counts as `info`. Times are
time.monotonic(), which every process on the machine shares, so histories written by several
processes can be merged. `expiry` on a completion is the session's expiry as the client knows it
after that operation: the send time of the latest confirmed CreateSession or refresh plus the TTL
the broker confirmed. It is a lower bound on the lease's real expiry, whatever the answer's delay.

Besides operations a history holds `nemesis` events (a fault injected or healed), `leader` events
(the etcd leader and raft term as polled), and `entry` events (a queue entry found in etcd when
the run was quiescent).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc

from lockbroker.client import LockBrokerError

Event = dict[str, Any]

# Failures after which the operation certainly did not take effect; the rest are indeterminate.
_DEFINITE_REASONS = {
    "acquire": {
        "LOCK_HELD",
        "WAIT_EXPIRED",
        "SESSION_NOT_FOUND",
        "SESSION_LOST",
        "ALREADY_QUEUED",
        "REQUEST_ID_REUSED",
        "INVALID_ARGUMENT",
        # The broker's own DEADLINE_EXCEEDED (with an ErrorInfo): it removed the queue entry.
        "DEADLINE_EXCEEDED",
    },
    "release": {"INVALID_ARGUMENT"},
    "refresh": {"SESSION_NOT_FOUND", "INVALID_ARGUMENT"},
    "create_session": {"INVALID_ARGUMENT", "REQUEST_ID_REUSED"},
    "close_session": {"INVALID_ARGUMENT"},
    "describe": {"INVALID_ARGUMENT"},
}
# Reads never change anything, so any failure of theirs is definite.
_READS = {"describe"}


def error_fields(err: BaseException) -> dict[str, Any]:
    if isinstance(err, LockBrokerError):
        fields: dict[str, Any] = {"code": err.code.name, "reason": err.reason, "message": err.message[:300]}
        holder = getattr(err, "holder", None)
        if holder is not None:
            fields["holder_token"] = holder.fencing_token
            fields["holder_session"] = holder.session_id
        if err.reason == "ALREADY_QUEUED":
            fields["existing_request_id"] = err.metadata.get("request_id", "")
        return fields
    if isinstance(err, grpc.RpcError):
        code = err.code() if hasattr(err, "code") else None
        return {"code": code.name if code is not None else "UNKNOWN", "reason": "", "message": str(err)[:300]}
    if isinstance(err, BaseException) and type(err).__name__ == "CancelledError":
        return {"code": "CANCELLED", "reason": "", "message": "cancelled by the client"}
    return {"code": "UNKNOWN", "reason": "", "message": repr(err)[:300]}


def is_definite(op: str, err: BaseException) -> bool:
    if op in _READS:
        return True
    if isinstance(err, LockBrokerError):
        return err.reason in _DEFINITE_REASONS.get(op, set())
    return False


class Pending:
    """An invoked operation, waiting for its completion."""

    __slots__ = ("_done", "client", "history", "id", "invoked_at", "op")

    def __init__(self, history: History, op_id: str, client: str, op: str, invoked_at: float) -> None:
        self.history = history
        self.id = op_id
        self.client = client
        self.op = op
        self.invoked_at = invoked_at
        self._done = False

    def _complete(self, kind: str, fields: dict[str, Any]) -> None:
        if self._done:
            raise RuntimeError(f"operation {self.id} completed twice")
        self._done = True
        self.history.record({"id": self.id, "type": kind, "client": self.client, "op": self.op, **fields})

    def ok(self, **fields: Any) -> None:
        self._complete("ok", fields)

    def fail(self, err: BaseException | None = None, **fields: Any) -> None:
        self._complete("fail", {**(error_fields(err) if err is not None else {}), **fields})

    def info(self, err: BaseException | None = None, **fields: Any) -> None:
        self._complete("info", {**(error_fields(err) if err is not None else {}), **fields})

    def error(self, err: BaseException, **fields: Any) -> None:
        """`fail` or `info`, whichever the error means for this kind of operation."""
        if is_definite(self.op, err):
            self.fail(err, **fields)
        else:
            self.info(err, **fields)


class History:
    """Events in memory and, if `path` is given, appended to a JSON-lines file as they happen.

    Each line is flushed at once, so a process killed with -9 leaves every event it completed.
    """

    def __init__(self, path: Path | None = None, *, prefix: str = "") -> None:
        self.events: list[Event] = []
        self.path = path
        self._file: IO[str] | None = path.open("a", encoding="utf-8") if path is not None else None
        self._ids = itertools.count(1)
        self._prefix = prefix

    def record(self, event: Event) -> Event:
        event.setdefault("time", time.monotonic())
        self.events.append(event)
        if self._file is not None:
            self._file.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._file.flush()
        return event

    def invoke(self, client: str, op: str, **fields: Any) -> Pending:
        op_id = f"{self._prefix}{client}:{next(self._ids)}"
        event = self.record({"id": op_id, "type": "invoke", "client": client, "op": op, **fields})
        return Pending(self, op_id, client, op, float(event["time"]))

    def nemesis(self, what: str, **fields: Any) -> Event:
        return self.record({"type": "nemesis", "op": what, **fields})

    def leader(self, leader: int | None, term: int) -> Event:
        return self.record({"type": "leader", "leader": leader, "term": term})

    def entry(self, lock: str, token: int, session: str, request_id: str) -> Event:
        return self.record(
            {"type": "entry", "lock": lock, "token": token, "session": session, "request_id": request_id}
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def extend(self, events: Iterable[Event]) -> None:
        """Merge events another process recorded (they already carry their own times and ids)."""
        for e in events:
            self.events.append(e)
            if self._file is not None:
                self._file.write(json.dumps(e, separators=(",", ":")) + "\n")
        if self._file is not None:
            self._file.flush()


def load(path: Path) -> list[Event]:
    """The events of a JSON-lines history; a torn last line (the writer was killed) is skipped."""
    events: list[Event] = []
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            events.append(doc)
    return events


def dump(events: Iterable[Event], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")


def by_time(events: Iterable[Event]) -> Iterator[Event]:
    return iter(sorted(events, key=lambda e: float(e["time"])))


__all__ = ["Event", "History", "Pending", "by_time", "dump", "error_fields", "is_definite", "load"]

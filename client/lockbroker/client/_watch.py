"""Client.watch: a lock's events as an async iterator, reconnecting from the last revision seen.

The broker sends every event of an etcd revision in one message, and each message's `revision`
says everything up to it was sent; so a reconnect with start_revision = the last message's
revision repeats nothing and misses nothing (lock.proto, LockService.Watch).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from grpc import aio

from lockbroker.client._retry import Backoff, retryable
from lockbroker.client.errors import from_rpc_error
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

# Consecutive failed (re)connects before the error is raised; a message received resets the count.
MAX_RECONNECTS = 8
_PREFIX = "LOCK_EVENT_TYPE_"


@dataclass(frozen=True, slots=True)
class LockEvent:
    """One change of a lock: type is GRANTED, RELEASED, EXPIRED, REVOKED, WAITER_QUEUED or WAITER_LEFT."""

    type: str
    name: str
    revision: int
    owner: str
    session_id: str
    fencing_token: int
    reason: str = ""  # REVOKED: REVOKED (an admin) or MAX_HOLD_EXCEEDED
    message: str = ""  # REVOKED: the admin's reason
    snapshot: bool = False  # part of the state at the watch's start, not a change

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "type": self.type,
            "name": self.name,
            "revision": self.revision,
            "owner": self.owner,
            "session_id": self.session_id,
            "fencing_token": str(self.fencing_token),
        }
        if self.reason:
            d["reason"] = self.reason
        if self.message:
            d["message"] = self.message
        if self.snapshot:
            d["snapshot"] = True
        return d


def event_of(ev: lock_pb2.LockEvent, snapshot: bool = False) -> LockEvent:
    kind = lock_pb2.LockEventType.Name(ev.type).removeprefix(_PREFIX)
    return LockEvent(
        kind, ev.name, ev.revision, ev.owner, ev.session_id, ev.fencing_token, ev.reason, ev.message, snapshot
    )


async def watch_events(
    stub: lock_pb2_grpc.LockServiceAsyncStub,
    metadata: Sequence[tuple[str, str]],
    name: str,
    *,
    prefix: bool,
    start_revision: int | None,
    backoff: Backoff,
) -> AsyncGenerator[LockEvent, None]:
    revision = start_revision or 0
    failures = 0
    while True:
        call = stub.Watch(lock_pb2.WatchRequest(name=name, prefix=prefix, start_revision=revision), metadata=metadata)
        try:
            async for resp in call:
                failures = 0
                for ev in resp.events:
                    yield event_of(ev, resp.snapshot)
                revision = resp.revision
            return  # the broker ended the stream without an error: nothing more will come
        except aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            failures += 1
            if not retryable(err) or failures > MAX_RECONNECTS:
                raise err from exc
            await asyncio.sleep(backoff.delay(failures - 1, getattr(err, "retry_after", None)))
        finally:
            call.cancel()


__all__ = ["LockEvent", "event_of", "watch_events"]

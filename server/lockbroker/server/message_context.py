"""One message of a Session stream as a call of its own: its context, and its answer when a
layer or handler aborts (session_stream.py serves the stream)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NoReturn, cast

import grpc
from grpc import aio

from lockbroker.interceptors.base import CallContext, CallState, Context
from lockbroker.interceptors.rpcstatus import DETAILS_KEY
from lockbroker.server import status
from lockbroker.server.core.errors import LockBrokerError
from lockbroker.v1 import lock_pb2


class MessageAborted(aio.AbortError):
    """A message's call ended with a status: the answer to send instead of ending the stream."""

    def __init__(self, answer: lock_pb2.Status) -> None:
        super().__init__(answer.message)
        self.answer = answer


def _answer_status(code: grpc.StatusCode, message: str, trailing: Sequence[tuple[str, str | bytes]]) -> lock_pb2.Status:
    # lock_pb2.Status is google.rpc.Status on the wire: the bytes the unary call would have sent
    # in grpc-status-details-bin parse as they are.
    for key, value in trailing:
        if key == DETAILS_KEY and isinstance(value, bytes):
            return lock_pb2.Status.FromString(value)
    return lock_pb2.Status(code=code.value[0], message=message)


def error_status(exc: LockBrokerError) -> lock_pb2.Status:
    return _answer_status(*status.to_status(exc))


class StreamFacts:
    """What a message's layers may read of the stream's grpc context, read once when it opens.

    A message's task never touches grpc's context itself. When a client cancels a stream while
    grpc is writing an answer, grpc leaves the handler's generators to asyncio, which closes them
    after the call is gone; the messages still in flight are cancelled only then, and their
    audit records must not read the finished call (reading `peer()` of one crashed cygrpc: see
    `interceptors.base.PinnedContext`). Copies cannot dangle; anything not here fails loudly.
    """

    __slots__ = ("_auth", "_metadata", "_peer")

    def __init__(self, context: Context) -> None:
        self._peer = context.peer()
        self._metadata = tuple(context.invocation_metadata() or ())
        self._auth = context.auth_context()

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[Any, ...]:
        return self._metadata

    def auth_context(self) -> Any:
        return self._auth


class MessageContext(CallContext):
    """One message's context: its own state, deadline and outcome over the stream's `StreamFacts`.

    `abort` raises `MessageAborted` (an `aio.AbortError`, so the edge and the layers treat it as
    the abort it stands for) instead of ending the stream.
    """

    __slots__ = ("_deadline", "_trailing")

    def __init__(self, facts: StreamFacts, state: CallState, deadline: float) -> None:
        super().__init__(cast(Context, facts), state)
        self._deadline = deadline
        self._trailing: Sequence[tuple[str, str | bytes]] = ()

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> NoReturn:
        state = self.state
        state.code, state.message = code, details or None
        state.reason = getattr(trailing_metadata, "reason", None)
        self._trailing = trailing_metadata
        raise MessageAborted(_answer_status(code, details, trailing_metadata))

    def set_code(self, code: grpc.StatusCode) -> None:
        self.state.code = code

    def set_details(self, details: str) -> None:
        self.state.message = details or None

    def code(self) -> grpc.StatusCode | None:
        return self.state.code

    def details(self) -> str | None:
        return self.state.message

    def trailing_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._trailing  # this message's, for layers that read details (the quota metric)

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())


__all__ = ["MessageAborted", "MessageContext", "StreamFacts", "error_status"]

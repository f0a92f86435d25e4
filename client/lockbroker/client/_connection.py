"""A Client's connection: its channel and API key, each call's deadline and retry, and the
transport its session operations take (messages on a few Session streams, or a unary RPC each).

`Connection` is the base of `aio.Client`, kept apart so that aio.py reads as the API (one method per
RPC, sessions and locks as context managers) while how each of those calls reaches the broker is
here. Users import DEFAULT_OPTIONS, TRANSPORT_ENV and Transport from `lockbroker.client.aio`.
"""

from __future__ import annotations

import builtins
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from lockbroker.client._clear import warn_if_key_in_clear
from lockbroker.client._keepalive import KEEPALIVE_STREAM_LIFETIME, KeepAliveMux
from lockbroker.client._retry import Backoff, call_with_retry
from lockbroker.client._session import ClientSupport
from lockbroker.client._stream import GoUnary, SessionStream, StreamKeepAlive
from lockbroker.client.admin import AdminClient
from lockbroker.client.types import Session, duration, seconds, timestamp
from lockbroker.v1 import lock_pb2, lock_pb2_grpc

_Req = TypeVar("_Req", bound=Message)
_Resp = TypeVar("_Resp", bound=Message)

# Matches the broker's keepalive policy: long Acquire waits and idle KeepAlive streams must
# notice a dead connection (a NAT or LB dropping it silently) well within a session TTL.
# Reconnecting: grpc's own backoff grows to 120 s, so a broker restarted after a minute's outage
# could stay unreachable to this client for two more minutes, and every session would lapse
# meanwhile. Sessions live for seconds: try again at least every 2 s.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


Transport = Literal["unary", "stream"]
TRANSPORT_ENV = "LOCKBROKER_CLIENT_TRANSPORT"


def _transport(value: str | None) -> Transport:
    chosen = value or os.environ.get(TRANSPORT_ENV) or "stream"
    if chosen not in ("unary", "stream"):
        raise ValueError(
            f"transport must be 'unary' or 'stream', not {chosen!r} (from {TRANSPORT_ENV} or the argument)"
        )
    return "stream" if chosen == "stream" else "unary"


class Connection:
    """The plumbing of `Client`: construction, closing, and the calls' way to the broker."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        default_timeout: float = 30.0,
        options: Sequence[tuple[str, Any]] | None = None,
        backoff: Backoff | None = None,
        transport: Transport | None = None,
    ) -> None:
        warn_if_key_in_clear(target, api_key, credentials)
        merged = dict(DEFAULT_OPTIONS)
        merged.update(dict(options or ()))
        opts = builtins.list(merged.items())
        channel = (
            aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else aio.insecure_channel(target, options=opts)
        )
        self._setup(
            channel,
            owns_channel=True,
            api_key=api_key,
            default_timeout=default_timeout,
            backoff=backoff,
            transport=transport,
        )

    @classmethod
    def from_channel(
        cls,
        channel: aio.Channel,
        *,
        api_key: str | None = None,
        default_timeout: float = 30.0,
        backoff: Backoff | None = None,
        transport: Transport | None = None,
    ) -> Self:
        """Wrap a channel you manage; closing the client leaves the channel open."""
        self = cls.__new__(cls)
        self._setup(
            channel,
            owns_channel=False,
            api_key=api_key,
            default_timeout=default_timeout,
            backoff=backoff,
            transport=transport,
        )
        return self

    def _setup(
        self,
        channel: aio.Channel,
        *,
        owns_channel: bool,
        api_key: str | None,
        default_timeout: float,
        backoff: Backoff | None,
        transport: Transport | None,
    ) -> None:
        if default_timeout <= 0:
            raise ValueError("default_timeout must be positive: every call needs a deadline")
        self._channel = channel
        self._owns_channel = owns_channel
        self._stub: lock_pb2_grpc.LockServiceAsyncStub = lock_pb2_grpc.LockServiceStub(channel)
        self._metadata: tuple[tuple[str, str], ...] = (("x-api-key", api_key),) if api_key else ()
        self.default_timeout = default_timeout
        self._backoff = backoff or Backoff()
        self.transport: Transport = _transport(transport)
        mux = KeepAliveMux(self._stub, self._metadata, KEEPALIVE_STREAM_LIFETIME)
        self._stream: SessionStream | None = None
        keepalive: KeepAliveMux | StreamKeepAlive = mux
        if self.transport == "stream":
            self._stream = SessionStream(self._stub, self._metadata, on_expired=self._session_expired)
            keepalive = StreamKeepAlive(self._stream, mux)
        # Handed to every SessionKeeper and LockContext of this client; see ClientSupport.
        self._support = ClientSupport(
            keepalive=keepalive,
            backoff=self._backoff,
            cleanup_timeout=min(default_timeout, 5.0),
            create_session=self._create_session,
        )
        self._closed = False
        # The operators' calls (AdminService); they need the admin role.
        self.admin = AdminClient(lock_pb2_grpc.AdminServiceStub(channel), self._unary, self._metadata, default_timeout)

    @property
    def channel(self) -> aio.Channel:
        return self._channel

    async def close(self) -> None:
        """Stop keepalives and close the channel (if the client made it). Sessions are not closed:
        leave their `async with` blocks first, or they lapse after their TTL."""
        if self._closed:
            return
        self._closed = True
        for keeper in builtins.list(self._support.keepers):
            await keeper._stop()
        await self._support.keepalive.close()
        if self._stream is not None:
            await self._stream.close()
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.default_timeout if timeout is None else timeout)

    def _session_expired(self, session_id: str) -> None:
        # The broker's event on the Session stream: tell the keeper now, not at its next refresh.
        for keeper in builtins.list(self._support.keepers):
            if keeper._session is not None and keeper.session_id == session_id:
                keeper._mark_lost("the broker reports the session expired")

    async def _via(self, kind: str, message: Message, unary: Callable[[float], Awaitable[_Resp]], left: float) -> _Resp:
        """One attempt of a session operation: a message on a Session stream (answer field
        `kind`), or the unary call when the transport is unary, the broker has no stream, its
        stream does not know this kind of message (an older broker), or every stream the client
        may open is full (the broker's in-flight bound per stream: see _stream.STREAM_IN_FLIGHT)."""
        stream = self._stream
        if stream is not None and not stream.unsupported:
            try:
                answer = await stream.request(kind, message, left)
            except GoUnary:
                pass
            else:
                resp: _Resp = getattr(answer, kind)
                return resp
        return await unary(left)

    async def _session_call(
        self, kind: str, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, timeout: float | None
    ) -> _Resp:
        async def attempt(left: float) -> _Resp:
            return await self._via(kind, request, lambda t: method(request, timeout=t, metadata=self._metadata), left)

        return await call_with_retry(attempt, deadline=self._deadline(timeout), backoff=self._backoff)

    async def _unary(
        self, method: aio.UnaryUnaryMultiCallable[_Req, _Resp], request: _Req, timeout: float | None
    ) -> _Resp:
        async def attempt(left: float) -> _Resp:
            return await method(request, timeout=left, metadata=self._metadata)

        return await call_with_retry(attempt, deadline=self._deadline(timeout), backoff=self._backoff)

    async def _create_session(
        self, ttl: float | None, owner: str, request_id: str | None, timeout: float | None
    ) -> tuple[Session, float]:
        # Always idempotent: a retry after a lost answer must find the same lease, not leak one.
        req = lock_pb2.CreateSessionRequest(owner=owner, request_id=request_id or str(uuid.uuid4()))
        if ttl is not None:
            req.ttl.CopyFrom(duration(ttl))
        # The lease may have been granted by the first attempt (a retry finds it): counting its
        # expiry from the first send keeps our estimate at or below etcd's, never above.
        sent = time.monotonic()

        async def attempt(left: float) -> lock_pb2.CreateSessionResponse:
            return await self._via(
                "open",
                lock_pb2.OpenSession(create=req),
                lambda t: self._stub.CreateSession(req, timeout=t, metadata=self._metadata),
                left,
            )

        resp = await call_with_retry(attempt, deadline=self._deadline(timeout), backoff=self._backoff)
        session = Session(
            resp.session_id, seconds(resp.ttl), timestamp(resp.expires_at) if resp.HasField("expires_at") else None
        )
        return session, sent


__all__ = ["DEFAULT_OPTIONS", "TRANSPORT_ENV", "Connection", "Transport"]

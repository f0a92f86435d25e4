"""A thin grpc.aio adapter over the generated etcd v3 stubs.

One channel per endpoint, used one at a time: a call that finds its endpoint unreachable moves the
client to the next endpoint for the calls after it, and fails itself. There are no hidden retries:
a write whose outcome is unknown is reported as such (`Unavailable(outcome_unknown=True)`) and the
caller resolves it by reading state. The only call sent twice is one etcd rejected for an expired
auth token, which etcd never applied.

Every grpc error from etcd is translated here, in `_translate`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import Message
from grpc import aio
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from lockbroker.server.core.backend import BackendError, LeaseExists, remaining
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd import rpc_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from lockbroker.server.config import EtcdConfig

log = logging.getLogger("lockbroker.etcd")

T = TypeVar("T")

# (etcd method, seconds, None or the failure's grpc code / error class name)
CallObserver = Callable[[str, float, "str | None"], None]

# etcd answers these when it cannot serve right now; all are worth retrying later.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # "etcdserver: too many requests"
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}
_TRANSIENT_MESSAGES = (
    "leader changed",
    "no leader",
    "timed out",
    "not capable",
    "too many requests",
    # UNKNOWN from a member whose own request to the leader timed out or was dropped (seen in
    # partitions): the outcome is unknown, not an error in the request.
    "context deadline exceeded",
    "context canceled",
)

_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 10_000),  # etcd's default --grpc-keepalive-min-time is 5 s
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),  # no hidden retries: see the module docstring
]

# Span name and attributes of each unary etcd call, by request type, read from the proto itself.
_RPC_NAMES: Final[dict[str, tuple[str, str]]] = {
    m.input_type.full_name: (s.full_name, m.name)
    for s in pb.DESCRIPTOR.services_by_name.values()
    for m in s.methods
    if not (m.client_streaming or m.server_streaming)
}

# Streams carry this so an etcd member that loses its leader closes them instead of going quiet.
REQUIRE_LEADER = (("hasleader", "true"),)


class LeaseNotFound(BackendError):
    pass


@dataclass(frozen=True)
class Endpoint:
    target: str  # host:port
    tls: bool

    @staticmethod
    def parse(url: str, tls_default: bool) -> Endpoint:
        if "://" not in url:
            return Endpoint(url, tls_default)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"etcd endpoint {url!r}: expected http://host:port or https://host:port")
        return Endpoint(parts.netloc, parts.scheme == "https")


class Stubs:
    """The generated stubs of one channel."""

    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel
        self.kv = pb_grpc.KVStub(channel)
        self.lease = pb_grpc.LeaseStub(channel)
        self.watch = pb_grpc.WatchStub(channel)
        self.maintenance = pb_grpc.MaintenanceStub(channel)
        self.auth = pb_grpc.AuthStub(channel)


class EtcdClient:
    """`tracer`: one CLIENT span per unary etcd call, child of the current span. Made here rather
    than by OTel's grpc.aio client interceptors: any client interceptor puts every call of the
    channel on grpc's intercepted path (an extra task and call object per call), which cost the
    broker more than the spans themselves.

    `observer(method, seconds, code)`: told of every unary call once it ends, for metrics. `code`
    is None on success, UNAVAILABLE for a transient failure, CANCELLED, or the error's class name
    (e.g. LeaseNotFound, BackendError)."""

    def __init__(
        self, config: EtcdConfig, *, tracer: trace.Tracer | None = None, observer: CallObserver | None = None
    ) -> None:
        if not config.endpoints:
            raise ValueError("no etcd endpoints")
        self._config = config
        self._tracer = tracer
        self._observer = observer
        tls_default = config.ca_file is not None or config.cert_file is not None
        self._endpoints = [Endpoint.parse(u, tls_default) for u in config.endpoints]
        self._stubs: dict[int, Stubs] = {}
        self._index = 0
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        # The newest etcd revision any answer has shown this client: every write it sends later is
        # ordered after that revision (see EtcdLockBackend.enqueue).
        self.revision = 0

    # -- channels ---------------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        c = self._config
        return grpc.ssl_channel_credentials(read(c.ca_file), read(c.key_file), read(c.cert_file))

    def current(self) -> tuple[int, Stubs]:
        idx = self._index
        stubs = self._stubs.get(idx)
        if stubs is None:
            ep = self._endpoints[idx]
            opts = list(_CHANNEL_OPTIONS)
            if self._config.tls_server_name:
                opts.append(("grpc.ssl_target_name_override", self._config.tls_server_name))
            if ep.tls:
                ch = aio.secure_channel(ep.target, self._credentials(), opts)
            else:
                ch = aio.insecure_channel(ep.target, opts)
            stubs = self._stubs[idx] = Stubs(ch)
        return idx, stubs

    def failover(self, idx: int) -> None:
        """Move to the next endpoint, unless another call already moved away from `idx`."""
        if len(self._endpoints) > 1 and self._index == idx:
            self._index = (idx + 1) % len(self._endpoints)
            log.warning(
                "etcd endpoint %s unreachable, trying %s",
                self._endpoints[idx].target,
                self._endpoints[self._index].target,
            )

    @property
    def request_timeout(self) -> float:
        return self._config.request_timeout

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._index].target

    async def close(self) -> None:
        stubs, self._stubs = list(self._stubs.values()), {}
        for s in stubs:
            await s.channel.close()

    # -- auth -------------------------------------------------------------------------------

    def metadata(self, extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
        return ((("token", self._token),) if self._token else ()) + extra

    async def authenticate(self, stale: str | None = None) -> None:
        if self._config.username is None:
            return
        async with self._auth_lock:
            if self._token is not None and self._token != stale:
                return  # another call already renewed it
            idx, stubs = self.current()
            req = pb.AuthenticateRequest(name=self._config.username, password=self._config.password or "")
            try:
                resp = await stubs.auth.Authenticate(req, timeout=remaining(self._config.request_timeout))
            except aio.AioRpcError as e:
                err = self._translate(e, idx, write=False)
                if isinstance(err, Unavailable):
                    raise err from None
                # etcd says INVALID_ARGUMENT for a wrong user or password: the broker's own
                # configuration is wrong, which callers can only wait out.
                log.error("etcd refused the broker's credentials: %s", e.details())
                raise Unavailable("the broker cannot authenticate to etcd", retry_after=5.0) from None
            self._token = resp.token

    @staticmethod
    def _bad_token(e: aio.AioRpcError) -> bool:
        return e.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in (e.details() or "")

    def needs_token(self) -> bool:
        return self._config.username is not None and self._token is None

    def is_stale_token(self, e: aio.AioRpcError) -> bool:
        return self._bad_token(e)

    def forget_token(self) -> None:
        self._token = None

    def report_stream_error(self, e: aio.AioRpcError, idx: int) -> None:
        """A shared stream broke: move to the next endpoint as a failed call would."""
        self._maybe_failover(e.code(), idx)

    def _maybe_failover(self, code: grpc.StatusCode, idx: int) -> None:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.failover(idx)

    # -- calls ------------------------------------------------------------------------------

    async def call(
        self,
        method: Callable[[Stubs], Callable[..., Awaitable[T]]],
        request: Message,
        *,
        write: bool,
        timeout: float | None = None,
    ) -> T:
        budget = remaining(timeout or self._config.request_timeout)
        if budget <= 0:
            raise Unavailable("the request's deadline passed before etcd was called", retry_after=0.0)
        if self._observer is not None:
            return await self._observed(method, request, write, budget)
        return await self._traced(method, request, write, budget)

    async def _observed(
        self, method: Callable[[Stubs], Callable[..., Awaitable[T]]], request: Message, write: bool, budget: float
    ) -> T:
        assert self._observer is not None
        t0 = time.perf_counter()
        code: str | None = None
        try:
            return await self._traced(method, request, write, budget)
        except Unavailable:
            code = "UNAVAILABLE"  # transient: etcd unreachable, overloaded, timed out or leaderless
            raise
        except BaseException as e:
            code = "CANCELLED" if isinstance(e, asyncio.CancelledError) else type(e).__name__
            raise
        finally:
            name = _RPC_NAMES.get(request.DESCRIPTOR.full_name, ("", "unknown"))[1]
            self._observer(name, time.perf_counter() - t0, code)

    async def _traced(
        self, method: Callable[[Stubs], Callable[..., Awaitable[T]]], request: Message, write: bool, budget: float
    ) -> T:
        if self._tracer is None or not is_instrumentation_enabled():
            return await self._call(method, request, write, budget, None)
        service, name = _RPC_NAMES.get(request.DESCRIPTOR.full_name, ("etcdserverpb", "unknown"))
        with self._tracer.start_as_current_span(
            f"/{service}/{name}",
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            return await self._call(method, request, write, budget, span)

    async def _call(
        self,
        method: Callable[[Stubs], Callable[..., Awaitable[T]]],
        request: Message,
        write: bool,
        budget: float,
        span: trace.Span | None,
    ) -> T:
        if self._config.username is not None and self._token is None:
            await self.authenticate()
        for attempt in (0, 1):
            idx, stubs = self.current()
            token = self._token
            try:
                resp = await method(stubs)(request, timeout=budget, metadata=self.metadata())
            except aio.AioRpcError as e:
                if attempt == 0 and self._bad_token(e):
                    await self.authenticate(stale=token)
                    continue
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", e.code().value[0])
                    span.set_status(trace.StatusCode.ERROR, f"{e.code().name}: {e.details()}")
                raise self._translate(e, idx, write) from None
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", 0)
            return resp
        raise AssertionError("unreachable")

    def _translate(self, e: aio.AioRpcError, idx: int, write: bool) -> Exception:
        code, details = e.code(), e.details() or ""
        if code in _TRANSIENT or any(m in details for m in _TRANSIENT_MESSAGES):
            self._maybe_failover(code, idx)
            # Only a write that may have reached etcd has an unknown outcome.
            unknown = write and code != grpc.StatusCode.RESOURCE_EXHAUSTED
            return Unavailable(f"etcd: {details or code.name}", retry_after=1.0, outcome_unknown=unknown)
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return LeaseNotFound(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION and "lease already exist" in details:
            return LeaseExists(details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The broker's own etcd credentials are wrong: an operator's problem, not the caller's.
            log.error("etcd refused the broker's credentials: %s", details)
            return Unavailable("the broker cannot authenticate to etcd", retry_after=5.0)
        return BackendError(f"etcd {code.name}: {details}")

    # -- typed helpers ----------------------------------------------------------------------

    def _saw(self, header: pb.ResponseHeader) -> None:
        self.revision = max(self.revision, header.revision)

    async def range(self, req: pb.RangeRequest) -> pb.RangeResponse:
        resp: pb.RangeResponse = await self.call(lambda s: s.kv.Range, req, write=False)
        self._saw(resp.header)
        return resp

    async def put(self, req: pb.PutRequest) -> pb.PutResponse:
        resp: pb.PutResponse = await self.call(lambda s: s.kv.Put, req, write=True)
        self._saw(resp.header)
        return resp

    async def txn(self, req: pb.TxnRequest, *, write: bool = True) -> pb.TxnResponse:
        resp: pb.TxnResponse = await self.call(lambda s: s.kv.Txn, req, write=write)
        self._saw(resp.header)
        return resp

    async def lease_grant(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantResponse:
        resp: pb.LeaseGrantResponse = await self.call(
            lambda s: s.lease.LeaseGrant, pb.LeaseGrantRequest(TTL=ttl, ID=lease_id), write=True
        )
        if resp.error:
            raise BackendError(f"etcd LeaseGrant: {resp.error}")
        return resp

    async def lease_revoke(self, lease_id: int) -> pb.LeaseRevokeResponse:
        return await self.call(lambda s: s.lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lease_id), write=True)

    async def lease_time_to_live(self, lease_id: int) -> pb.LeaseTimeToLiveResponse:
        return await self.call(lambda s: s.lease.LeaseTimeToLive, pb.LeaseTimeToLiveRequest(ID=lease_id), write=False)

    async def status(self, timeout: float | None = None) -> pb.StatusResponse:
        return await self.call(lambda s: s.maintenance.Status, pb.StatusRequest(), write=False, timeout=timeout)

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
from contextlib import AbstractContextManager
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
from lockbroker.server.core.errors import BackendNoSpace, Unavailable
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
    # UNKNOWN from etcd 3.4 for errors it has no gRPC status for: a proposal dropped during a
    # leader transfer or election ("raft proposal dropped"), a member stopping ("raft: stopped").
    # Unmapped, they reached callers as INTERNAL (the likely INTERNAL of the frozen-member test,
    # which moves leadership off a member first).
    "proposal dropped",
    "raft: stopped",
    "server stopped",
    # grpc's own, when a member's connection goes away under a call (UNKNOWN or INTERNAL).
    "Stream removed",
    "RST_STREAM",
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

_TXN = pb.TxnRequest.DESCRIPTOR

# Seconds a member may leave a read unanswered before the read is sent to the next endpoint
# (once per call, and only with time left for it): see EtcdClient._call. A healthy member answers
# a linearizable read in milliseconds; one without a leader fails it rather than waiting.
READ_ATTEMPT = 1.0

# Streams carry this so an etcd member that loses its leader closes them instead of going quiet.
REQUIRE_LEADER = (("hasleader", "true"),)


# etcd's ErrNoSpace: a write refused by the space quota, or any write while the NOSPACE alarm is on.
_NO_SPACE = "database space exceeded"

# etcd's own fixed messages that say why it could not serve: safe to show callers, unlike grpc's
# transport details. Anything else is just "unavailable".
_REASONS = ("leader changed", "no leader", "too many requests", "timed out")


def _unavailable_message(code: grpc.StatusCode, details: str) -> str:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "etcd did not answer in time; retry"
    why = next((r for r in _REASONS if r in details), None)
    return f"etcd is unavailable ({why}); retry" if why else "etcd is unavailable; retry"


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


def _span_failed(span: trace.Span, e: aio.AioRpcError) -> None:
    span.set_attribute("rpc.grpc.status_code", e.code().value[0])
    span.set_status(trace.StatusCode.ERROR, f"{e.code().name}: {e.details()}")


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
        # Write Txns sent and not yet answered, and who to tell when one ends: the group commit
        # (etcd/batch.py) sends a Txn at once while none is in flight, else queues it until one
        # ends. Counted here, in `call`, so the unbatched path costs no frame of its own.
        self.txns_in_flight = 0
        self.after_txn: Callable[[], None] | None = None
        self._no_space_logged = -1e9
        self._failures: dict[tuple[int, str], tuple[float, int]] = {}  # last line, calls not logged
        # Counts moves between endpoints; _left[i] is the count when the calls last left endpoint
        # i, so a shared stream opened on i at an earlier count knows to follow them.
        self.generation = 0
        self._left: dict[int, int] = {}

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
            self.generation += 1
            self._left[idx] = self.generation
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

    def left_since(self, idx: int, generation: int) -> bool:
        """Whether the calls moved away from endpoint `idx` after `generation`."""
        return self._left.get(idx, 0) > generation

    def target_of(self, idx: int) -> str:
        """host:port of endpoint `idx`, for the broker's log (never for callers)."""
        return self._endpoints[idx].target if 0 <= idx < len(self._endpoints) else "(none)"

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

    async def call(  # noqa: PLR0915 - one frame on purpose: see the docstring
        self,
        method: Callable[[Stubs], Callable[..., Awaitable[T]]],
        request: Message,
        *,
        write: bool,
        timeout: float | None = None,
    ) -> T:
        """One etcd call within what is left of the RPC's deadline: token renewal, one retry of a
        read off a silent member, the CLIENT span and the metrics observation, all in this one
        frame (issue 13 counts the frames between grpc's handler and the etcd stub; each helper
        coroutine here used to add one on every call). Every response header's revision is noted
        in `revision` (the release-mark compare of enqueues reads it)."""
        budget = remaining(timeout or self._config.request_timeout)
        if budget <= 0:
            raise Unavailable("the request's deadline passed before etcd was called", retry_after=0.0)
        scope = self._span_scope(request)
        span = scope.__enter__() if scope is not None else None
        t0 = time.perf_counter()
        failure: str | None = None
        commit = write and request.DESCRIPTOR is _TXN
        if commit:
            self.txns_in_flight += 1
        try:
            if self._config.username is not None and self._token is None:
                await self.authenticate()
            deadline = time.monotonic() + budget
            renewed = moved = False
            while True:  # at most three attempts: one after a token renewal, one off a silent member
                idx, stubs = self.current()
                token = self._token
                left = deadline - time.monotonic()
                # A frozen member (SIGSTOP) answers nothing and returns no error, so a read it leaves
                # unanswered for READ_ATTEMPT moves on to the next endpoint once, within the budget.
                # Only reads: a write's outcome would be unknown, and its caller resolves that.
                bounded = not write and not moved and len(self._endpoints) > 1 and left > READ_ATTEMPT + 0.1
                try:
                    resp = await method(stubs)(
                        request, timeout=min(left, READ_ATTEMPT) if bounded else left, metadata=self.metadata()
                    )
                except aio.AioRpcError as e:
                    if not renewed and self._bad_token(e):
                        renewed = True
                        await self.authenticate(stale=token)
                        continue
                    if bounded and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        moved = True
                        log.info("etcd at %s left a read unanswered for %.1fs", self.target_of(idx), READ_ATTEMPT)
                        self.failover(idx)
                        continue
                    if span is not None:
                        _span_failed(span, e)
                    raise self._translate(e, idx, write) from None
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", 0)
                header = getattr(resp, "header", None)
                if header is not None and header.revision > self.revision:
                    self.revision = header.revision
                return resp
        except Unavailable:
            failure = "UNAVAILABLE"  # transient: etcd unreachable, overloaded, timed out or leaderless
            raise
        except BaseException as e:
            failure = "CANCELLED" if isinstance(e, asyncio.CancelledError) else type(e).__name__
            raise
        finally:
            if commit:
                self.txns_in_flight -= 1
                if self.after_txn is not None:
                    self.after_txn()
            if scope is not None:
                # The span records no exception (record_exception=False): ending it is all that is left.
                scope.__exit__(None, None, None)
            if self._observer is not None:
                self._observe(request, time.perf_counter() - t0, failure)

    def _span_scope(self, request: Message) -> AbstractContextManager[trace.Span] | None:
        """The CLIENT span of one etcd call (named like grpc's own), or None when not tracing."""
        if self._tracer is None or not is_instrumentation_enabled():
            return None
        parent = trace.get_current_span()
        if not parent.is_recording() and parent.get_span_context().is_valid:
            # Inside a call its sampler dropped: a child span would be dropped too (parent-based),
            # so none is made; root spans (no call around them) still go to the sampler.
            return None
        service, name = _RPC_NAMES.get(request.DESCRIPTOR.full_name, ("etcdserverpb", "unknown"))
        return self._tracer.start_as_current_span(
            f"/{service}/{name}",
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        )

    def _observe(self, request: Message, seconds: float, failure: str | None) -> None:
        assert self._observer is not None
        self._observer(_RPC_NAMES.get(request.DESCRIPTOR.full_name, ("", "unknown"))[1], seconds, failure)

    def _translate(self, e: aio.AioRpcError, idx: int, write: bool) -> Exception:
        code, details = e.code(), e.details() or ""
        if _NO_SPACE in details:
            # RESOURCE_EXHAUSTED like "too many requests", but no retry soon will help: say so.
            now = time.monotonic()
            if now - self._no_space_logged > 10.0:  # at most one line per 10 s however many calls
                self._no_space_logged = now
                log.error("etcd at %s is out of space (NOSPACE alarm): %s", self.target_of(idx), details)
            return BackendNoSpace()
        if code in _TRANSIENT or any(m in details for m in _TRANSIENT_MESSAGES):
            # The caller learns only what it can act on (retry); grpc's details name the endpoint
            # and the OS error, so they stay in the broker's log (issue 18 item 13).
            self._log_failure(idx, code, details)
            self._maybe_failover(code, idx)
            # Only a write that may have reached etcd has an unknown outcome.
            unknown = write and code != grpc.StatusCode.RESOURCE_EXHAUSTED
            return Unavailable(_unavailable_message(code, details), retry_after=1.0, outcome_unknown=unknown)
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return LeaseNotFound(details)
        if code == grpc.StatusCode.FAILED_PRECONDITION and "lease already exist" in details:
            return LeaseExists(details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The broker's own etcd credentials are wrong: an operator's problem, not the caller's.
            log.error("etcd refused the broker's credentials: %s", details)
            return Unavailable("the broker cannot authenticate to etcd", retry_after=5.0)
        return BackendError(f"etcd {code.name}: {details}")

    def _log_failure(self, idx: int, code: grpc.StatusCode, details: str) -> None:
        """One line per endpoint and code every 5 s at most: an outage fails every call."""
        now = time.monotonic()
        key = (idx, code.name)
        last, quiet = self._failures.get(key, (-1e9, 0))
        if now - last < 5.0:
            self._failures[key] = (last, quiet + 1)
            return
        self._failures[key] = (now, 0)
        more = f" (and {quiet} more since the last line)" if quiet else ""
        log.info("etcd call to %s failed: %s %s%s", self.target_of(idx), code.name, details, more)

    # -- typed helpers ----------------------------------------------------------------------

    # The helpers below return `call`'s coroutine instead of awaiting it, so they cost no frame on
    # the call path; `call` notes each response's revision itself.

    def range(self, req: pb.RangeRequest) -> Awaitable[pb.RangeResponse]:
        return self.call(lambda s: s.kv.Range, req, write=False)

    def put(self, req: pb.PutRequest) -> Awaitable[pb.PutResponse]:
        return self.call(lambda s: s.kv.Put, req, write=True)

    def txn(self, req: pb.TxnRequest, *, write: bool = True) -> Awaitable[pb.TxnResponse]:
        return self.call(lambda s: s.kv.Txn, req, write=write)

    async def lease_grant(self, ttl: int, lease_id: int = 0) -> pb.LeaseGrantResponse:
        resp: pb.LeaseGrantResponse = await self.call(
            lambda s: s.lease.LeaseGrant, pb.LeaseGrantRequest(TTL=ttl, ID=lease_id), write=True
        )
        if resp.error:
            raise BackendError(f"etcd LeaseGrant: {resp.error}")
        return resp

    def lease_revoke(self, lease_id: int) -> Awaitable[pb.LeaseRevokeResponse]:
        return self.call(lambda s: s.lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lease_id), write=True)

    def lease_time_to_live(self, lease_id: int) -> Awaitable[pb.LeaseTimeToLiveResponse]:
        return self.call(lambda s: s.lease.LeaseTimeToLive, pb.LeaseTimeToLiveRequest(ID=lease_id), write=False)

    def status(self, timeout: float | None = None) -> Awaitable[pb.StatusResponse]:
        return self.call(lambda s: s.maintenance.Status, pb.StatusRequest(), write=False, timeout=timeout)

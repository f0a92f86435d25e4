"""Who is calling: an API key in `x-api-key`, or the client certificate of a mutual-TLS connection.

The tenant comes only from a credential the broker verified; nothing a client writes in metadata
(`x-tenant` or anything else) names its tenant. Without a tenants registry this interceptor is not
installed and every call acts for the anonymous `default` tenant (see `principal`).

Rules, for every call outside health and reflection:

* `x-api-key` present: it must verify (a wrong key is never rescued by a certificate); sent twice, rejected.
* certificate: its SPIFFE ID if it has a URI SAN starting "spiffe://", else its subject CN, looked up as
  "spiffe://..." or "CN=<cn>". A certificate the registry does not know is not an error by itself: a
  mesh may give every client a transport certificate and leave tenancy to API keys.
* both map to a tenant: they must agree, or the call is rejected rather than guessing.
* neither: UNAUTHENTICATED, with one fixed message whatever was wrong.

What grpcio 1.85 exposes in `context.auth_context()` for a verified client certificate (bytes values):
`x509_common_name`, `x509_subject` ("CN=..."), `x509_subject_alternative_name`, `x509_pem_cert`,
`peer_uri` / `peer_dns` / `peer_email` / `peer_ip` per SAN type, and `peer_spiffe_id` only when the
certificate has exactly one URI SAN and it is a SPIFFE ID (the SPIFFE X.509-SVID rule). Plaintext and
server-only TLS connections have none of these keys.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from lockbroker.interceptors.base import (
    CallInfo,
    Context,
    Layer,
    StreamBehavior,
    WrappingInterceptor,
    scoped,
    state_of,
)
from lockbroker.interceptors.principal import Principal
from lockbroker.interceptors.rpcstatus import Trailers, trailers
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.auth")

API_KEY_HEADER = "x-api-key"
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"
PERMISSION_DENIED_MESSAGE = "this call needs the admin role"

_UNAUTHENTICATED = trailers(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, ErrorReason.UNAUTHENTICATED)
_PERMISSION_DENIED = trailers(
    grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE, ErrorReason.PERMISSION_DENIED
)


class CredentialCheckBusy(Exception):
    """The registry cannot check this credential now (too many checks queued); nothing was hashed.

    The caller gets RESOURCE_EXHAUSTED / RATE_LIMITED with a RetryInfo of `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many credential checks in progress; retry in {retry_after:g}s")
        self.retry_after = retry_after


class Registry(Protocol):
    """What identity needs from the tenants registry (`lockbroker.server.auth.tenants.TenantRegistry`)."""

    def __len__(self) -> int: ...

    async def authenticate_key(self, key: str, alive: Callable[[], bool] | None = None) -> Principal | None:
        """The principal of a valid API key, or None. May raise CredentialCheckBusy, and
        CancelledError when `alive()` says the caller is gone before its key was checked."""

    def for_identity(self, identity: str) -> Principal | None:
        """The principal an mTLS identity ("spiffe://..." or "CN=...") maps to, or None."""

    def key_id(self, key: str) -> str:
        """The public part of a key, safe to log."""


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The identity of a verified client certificate as the tenants file writes it, or None.

    A certificate with a spiffe:// URI SAN that grpc did not accept as its SPIFFE ID (several URI SANs)
    gets no identity at all: falling back to its CN would name it by a field SPIFFE issuers leave free.
    """
    spiffe = list(auth_context.get("peer_spiffe_id", ()))
    if len(spiffe) == 1:
        return spiffe[0].decode("utf-8", "replace")
    if any(uri.startswith(b"spiffe://") for uri in auth_context.get("peer_uri", ())):
        return None
    cn = list(auth_context.get("x509_common_name", ()))
    if len(cn) == 1 and cn[0]:
        return "CN=" + cn[0].decode("utf-8", "replace")
    return None


class IdentityInterceptor(WrappingInterceptor):
    """Writes the caller's principal on every non-open call's state, or ends the call UNAUTHENTICATED."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @classmethod
    def from_registry(cls, registry: Registry | None) -> IdentityInterceptor | None:
        """None when no authentication is configured (no registry, or one without tenants): install nothing."""
        if registry is None or len(registry) == 0:
            return None
        return cls(registry)

    async def authenticate(self, context: Context) -> Principal | None:
        """The caller's principal, or None; writes what it presented on the call's state."""
        state = state_of(context)
        keys = [v for k, v in context.invocation_metadata() or () if k == API_KEY_HEADER]
        identity = certificate_identity(context.auth_context())
        if len(keys) > 1:
            state.credential = ("(sent more than once)", identity)
            log.debug("rejected: x-api-key sent more than once", extra={"peer": context.peer()})
            return None
        by_key: Principal | None = None
        if keys:
            key = keys[0] if isinstance(keys[0], str) else keys[0].decode("ascii", "replace")
            state.credential = (self.registry.key_id(key), identity)
            by_key = await self.registry.authenticate_key(key, _alive(context))
            if by_key is None:
                # The id is not secret and helps an operator find the client; the key itself is never logged.
                log.debug(
                    "rejected: invalid api key", extra={"peer": context.peer(), "key_id": self.registry.key_id(key)}
                )
                return None
        elif identity is not None:
            state.credential = (None, identity)
        by_cert = self.registry.for_identity(identity) if identity else None
        if by_key is not None and by_cert is not None and by_key.tenant != by_cert.tenant:
            log.debug(
                "rejected: api key and client certificate name different tenants",
                extra={"peer": context.peer(), "key_id": by_key.id, "identity": identity},
            )
            return None
        principal = by_key or by_cert
        if principal is None:
            log.debug("rejected: no known credential", extra={"peer": context.peer(), "identity": identity})
        return principal

    async def _admit(self, context: Context) -> None:
        state = state_of(context)
        try:
            state.principal = await self.authenticate(context)
        except CredentialCheckBusy as busy:
            state.principal = None
            await context.abort(*_busy(busy.retry_after))
        if state.principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, _UNAUTHENTICATED)

    def layer(self, call: CallInfo) -> Layer | None:
        if call.open:
            return None
        return Layer(before=self._before)

    async def _before(self, request: Any, context: Context) -> None:
        await self._admit(context)

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        if call.open:
            return behavior

        async def authenticated(request: Any, context: Context) -> AsyncIterator[Any]:
            context = scoped(context, call)
            await self._admit(context)
            responses: Any = behavior(request, context)
            try:
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:
                    # A handler written against `context.write` returns a coroutine, not an iterator.
                    await responses
            finally:
                # `async for` leaves the inner generator suspended when the call ends early (client
                # gone, cancelled); close it here so its cleanup runs now.
                if hasattr(responses, "aclose"):
                    await responses.aclose()

        return authenticated


def _alive(context: Context) -> Callable[[], bool]:
    """Whether the caller still waits for this call (not cancelled, deadline not passed)."""

    def alive() -> bool:
        left = context.time_remaining()
        return not context.done() and (left is None or left > 0)

    return alive


def _busy(retry_after: float) -> tuple[grpc.StatusCode, str, Trailers]:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    message = f"too many credential checks in progress; retry in {retry_after:g}s"
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(retry_after * 1000))
    meta = {"limit": "credential_checks"}
    details = [error_details_pb2.RetryInfo(retry_delay=delay)]
    return code, message, trailers(code, message, ErrorReason.RATE_LIMITED, meta, details)


async def require_admin(context: Context) -> Principal:
    """The call's principal if it has the admin role; otherwise ends the call PERMISSION_DENIED.

    Kept for the admin RPCs to come (issue 15). With no authentication configured the caller is
    the anonymous principal, which is not an admin.
    """
    principal = state_of(context).principal
    if principal is None or not principal.admin:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE, _PERMISSION_DENIED)
    return principal

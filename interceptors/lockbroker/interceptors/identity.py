"""Who is calling: an API key in `x-api-key`, or the client certificate of a mutual-TLS connection.

The tenant comes only from a credential the broker verified; nothing a client writes in metadata
(`x-tenant` or anything else) names its tenant. Without a tenants registry this interceptor is not
installed and every call acts for the anonymous `default` tenant (see `tenancy`).

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

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc

from lockbroker.interceptors.base import CallInfo, Context, StreamBehavior, UnaryBehavior, WrappingInterceptor
from lockbroker.interceptors.rpcstatus import trailers
from lockbroker.interceptors.tenancy import Principal, current_principal
from lockbroker.interceptors.tenants import TenantRegistry, parse_key
from lockbroker.v1.reasons import ErrorReason

log = logging.getLogger("lockbroker.auth")

API_KEY_HEADER = "x-api-key"
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"
PERMISSION_DENIED_MESSAGE = "this call needs the admin role"

_UNAUTHENTICATED = trailers(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, ErrorReason.UNAUTHENTICATED)
_PERMISSION_DENIED = trailers(
    grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE, ErrorReason.PERMISSION_DENIED
)


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
    """Sets `current_principal` around every non-open call, or ends it UNAUTHENTICATED."""

    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry

    @classmethod
    def from_registry(cls, registry: TenantRegistry | None) -> IdentityInterceptor | None:
        """None when no authentication is configured (no registry, or one without tenants): install nothing."""
        if registry is None or len(registry) == 0:
            return None
        return cls(registry)

    async def authenticate(self, context: Context) -> Principal | None:
        keys = [v for k, v in context.invocation_metadata() or () if k == API_KEY_HEADER]
        if len(keys) > 1:
            log.debug("rejected: x-api-key sent more than once", extra={"peer": context.peer()})
            return None
        by_key: Principal | None = None
        if keys:
            key = keys[0] if isinstance(keys[0], str) else keys[0].decode("ascii", "replace")
            by_key = await self.registry.authenticate_key(key)
            if by_key is None:
                # The id is not secret and helps an operator find the client; the key itself is never logged.
                log.debug("rejected: invalid api key", extra={"peer": context.peer(), "key_id": _key_id(key)})
                return None
        identity = certificate_identity(context.auth_context())
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

    async def _principal_or_abort(self, context: Context) -> Principal:
        principal = await self.authenticate(context)
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, _UNAUTHENTICATED)
        return principal

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        if call.open:
            return behavior

        async def authenticated(request: Any, context: Context) -> Any:
            token = current_principal.set(await self._principal_or_abort(context))
            try:
                return await behavior(request, context)
            finally:
                current_principal.reset(token)

        return authenticated

    def wrap_stream(self, behavior: StreamBehavior, call: CallInfo) -> StreamBehavior:
        if call.open:
            return behavior

        async def authenticated(request: Any, context: Context) -> AsyncIterator[Any]:
            token = current_principal.set(await self._principal_or_abort(context))
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
                # gone, cancelled); close it here so its cleanup runs now and in this call's context.
                if hasattr(responses, "aclose"):
                    await responses.aclose()
                # An abandoned stream may be finalised later from another task, whose context never
                # saw this token; there is nothing to undo there.
                with contextlib.suppress(ValueError):
                    current_principal.reset(token)

        return authenticated


def _key_id(key: str) -> str:
    parsed = parse_key(key)
    return parsed[0] if parsed else "(malformed)"


async def require_admin(context: Context) -> Principal:
    """The current principal if it has the admin role; otherwise ends the call PERMISSION_DENIED.

    With no authentication configured the caller is the anonymous principal, which is not an admin.
    """
    principal = current_principal.get()
    if not principal.admin:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE, _PERMISSION_DENIED)
    return principal

"""Who the current call acts for.

The identity interceptor sets `current_principal` around each handler; with no authentication
configured nobody sets it and every call acts for the single `default` tenant (the broker then
listens on loopback only, see `lockbroker.server.app`).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    kind: str  # "anonymous", "api-key", "mtls"
    id: str
    admin: bool = False


ANONYMOUS = Principal(DEFAULT_TENANT, "anonymous", "")

current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_principal", default=ANONYMOUS)


def tenant_of(_context: object) -> str:
    return current_principal.get().tenant

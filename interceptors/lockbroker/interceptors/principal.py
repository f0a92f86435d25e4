"""Who a call acts for.

The identity interceptor writes the caller's principal on the call's state (see
`lockbroker.interceptors.base.CallState`); with no authentication configured nobody writes it and
every call acts for the anonymous principal of the single `default` tenant (the broker then
listens on loopback only, see `lockbroker.server.app`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TENANT = "default"

_TENANT = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")


def tenant_problem(tenant: str) -> str | None:
    """Why `tenant` cannot name a tenant (it becomes a segment of etcd keys), or None."""
    if not _TENANT.fullmatch(tenant):
        return "must be 1-63 characters of a-z 0-9 _ -, starting with a letter or digit"
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    kind: str  # "anonymous", "api-key", "mtls"
    id: str
    admin: bool = False


ANONYMOUS = Principal(DEFAULT_TENANT, "anonymous", "")

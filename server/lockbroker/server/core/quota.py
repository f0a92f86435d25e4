"""Per-tenant quotas: what each limit means, and how the limits on state in etcd are counted.

A limit on state (sessions, queue entries, a lock's queue length) must hold across every broker
replica sharing one etcd, so it cannot be a counter in one broker's memory. Each such limit is a
*pool* of N slot keys in etcd; holding a session or a queue entry means holding one slot key, put
in the same transaction as the session record or the entry, bound to the same lease, and deleted
in the same transaction that deletes the entry. The transaction compares that the slot key does
not exist yet, so two replicas can never both take the last slot, and a lease that ends frees its
slots together with its keys. A full pool is the quota being reached: the transaction puts nothing.

Which slot: a hash of the owning key picks one (no read on the common path); when it is taken, the
pool's keys are read once and a free slot is picked at random.

Limits on flow (the acquire, read and session rates, blocked waiters) are per replica: see
`lockbroker.interceptors.quota` and `LockCore`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# One place for the meaning of every limit: config help, errors and docs/quotas.md use these words.
LIMITS: dict[str, str] = {
    "max_sessions": "sessions (CreateSession and session-less Acquire) alive at once",
    "max_locks": "queue entries at once: locks held plus Acquire calls waiting in a queue",
    "max_waiters_per_lock": "entries waiting behind the holder of any one lock",
    "max_waiters": "blocking Acquire calls waiting at once on one broker replica",
    "max_ttl": "longest session TTL in seconds (0: the server's --limits-max-ttl)",
    "max_streams": "KeepAlive streams open at once on one broker replica (each carries any number of sessions)",
    "max_wait": "longest Acquire wait_timeout in seconds (0: the server's --limits-max-wait)",
    "acquire_rate": "Acquire calls per second on one broker replica (token bucket; 0: no limit)",
    "acquire_burst": "Acquire calls allowed at once above acquire_rate (token bucket size)",
    "read_rate": "Describe and List calls per second on one broker replica (token bucket; 0: no limit)",
    "read_burst": "Describe and List calls allowed at once above read_rate (token bucket size)",
    "session_rate": (
        "CreateSession, Refresh, CloseSession and Release calls, and KeepAlive streams opened, per second "
        "on one broker replica (token bucket; 0: no limit)"
    ),
    "session_burst": "session calls allowed at once above session_rate (token bucket size)",
    "max_hold": "longest a grant may be held, in seconds, before the broker revokes it (0: no limit)",
    "lock_delay": (
        "seconds a lock stays ungranted after its holder was lost (session expired, closed or revoked; grant "
        "revoked), not after a clean release (0: none)"
    ),
    "max_lock_delay": "longest lock_delay an Acquire may ask for, in seconds (at least lock_delay)",
}


@dataclass(frozen=True)
class TenantQuota:
    """The limits of one tenant; 0 means no limit (for max_ttl/max_wait: the server's limit)."""

    max_sessions: int = field(default=10_000, metadata={"help": LIMITS["max_sessions"]})
    max_locks: int = field(default=100_000, metadata={"help": LIMITS["max_locks"]})
    max_waiters_per_lock: int = field(default=1_000, metadata={"help": LIMITS["max_waiters_per_lock"]})
    max_waiters: int = field(default=20_000, metadata={"help": LIMITS["max_waiters"]})
    max_streams: int = field(default=1_000, metadata={"help": LIMITS["max_streams"]})
    max_ttl: int = field(default=0, metadata={"help": LIMITS["max_ttl"]})
    max_wait: float = field(default=0.0, metadata={"help": LIMITS["max_wait"]})
    acquire_rate: float = field(default=2_000.0, metadata={"help": LIMITS["acquire_rate"]})
    acquire_burst: int = field(default=4_000, metadata={"help": LIMITS["acquire_burst"]})
    read_rate: float = field(default=1_000.0, metadata={"help": LIMITS["read_rate"]})
    read_burst: int = field(default=2_000, metadata={"help": LIMITS["read_burst"]})
    session_rate: float = field(default=2_000.0, metadata={"help": LIMITS["session_rate"]})
    session_burst: int = field(default=4_000, metadata={"help": LIMITS["session_burst"]})
    max_hold: float = field(default=0.0, metadata={"help": LIMITS["max_hold"]})
    lock_delay: float = field(default=0.0, metadata={"help": LIMITS["lock_delay"]})
    max_lock_delay: float = field(default=0.0, metadata={"help": LIMITS["max_lock_delay"]})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"quota {f.name} must be a number >= 0, not {value!r}")
        for bucket in ("acquire", "read", "session"):
            if getattr(self, f"{bucket}_rate") and getattr(self, f"{bucket}_burst") < 1:
                raise ValueError(f"quota {bucket}_burst must be at least 1 when {bucket}_rate is set")

    def with_overrides(self, overrides: Mapping[str, Any], where: str) -> TenantQuota:
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            f = known.get(name)
            if f is None:
                raise ValueError(f"{where}: unknown quota {name!r}; known: {', '.join(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: quota {name} must be a number, not {value!r}")
            if f.type in ("int", int) and not float(value).is_integer():
                raise ValueError(f"{where}: quota {name} must be a whole number, not {value!r}")
            changes[name] = int(value) if f.type in ("int", int) else float(value)
        try:
            return replace(self, **changes)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


class Quotas:
    """The quota of each tenant: the defaults, with the tenants file's per-tenant overrides."""

    def __init__(self, default: TenantQuota, overrides: Mapping[str, TenantQuota] | None = None) -> None:
        self.default = default
        self._overrides = dict(overrides or {})

    def __call__(self, tenant: str) -> TenantQuota:
        return self._overrides.get(tenant, self.default)

    def any(self, test: Callable[[TenantQuota], bool]) -> bool:
        return test(self.default) or any(test(q) for q in self._overrides.values())


QuotaLookup = Callable[[str], TenantQuota]

UNLIMITED = TenantQuota(
    max_sessions=0,
    max_locks=0,
    max_waiters_per_lock=0,
    max_waiters=0,
    max_streams=0,
    acquire_rate=0,
    acquire_burst=0,
    read_rate=0,
    read_burst=0,
    session_rate=0,
    session_burst=0,
)


@dataclass(frozen=True, slots=True)
class Pool:
    """N slot keys `<prefix><i>`; holding one counts one unit of the limit named `limit`."""

    prefix: bytes
    size: int
    limit: str

    def slot(self, owner: bytes, attempt: int = 0) -> bytes:
        digest = hashlib.blake2b(owner + attempt.to_bytes(2, "big"), digest_size=8).digest()
        return self.key(int.from_bytes(digest, "big") % self.size)

    def key(self, index: int) -> bytes:
        return self.prefix + str(index).encode()

    def index_of(self, key: bytes) -> int:
        return int(key[len(self.prefix) :])

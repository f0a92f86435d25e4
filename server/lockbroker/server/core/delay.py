"""Lock-delay: after a holder is lost (not cleanly released), the lock is not granted again for a while.

Chubby and Consul have it: a holder whose session expired (or that an operator took the lock
from) may still have writes in flight, so handing the lock on at once invites overlapping
writers. Fencing tokens fix that only where the resource checks them; a delay covers resources
that cannot (docs/locks.md: when to use which).

State, all in etcd (so a broker restart in the middle keeps the rule), beside the tenant's keys:

    <root>/t/<tenant>/d/<key name>#p<fencing token>  -> {"d": delay seconds}
                                              put when a grant with a delay is made, no lease
    the same key, rewritten                  -> {"d": delay, "u": until, unix seconds}
                                              once the grant is known lost: the delay runs

A clean Release deletes the grant's key before it deletes the grant (so a waiter handed the lock
by that release never sees it). Whatever removes a grant otherwise (its session's lease ending,
RevokeSession, ForceRelease, the max-hold sweep) leaves the key behind. The next grant of the lock
checks the keys of older grants (`hold_back`): a key without "u" is a lost grant, and the delay
starts now; one with "u" in the future holds the grant back until then; one in the past is
deleted. Revocations by the broker itself start the delay at once (`start_now`), so it does not
wait for the next Acquire to be noticed. A lease that lapses on a lock nobody waits for is
noticed by the next Acquire, and the delay counts from then: etcd records no time of expiry.

Waiters keep their queue places: the first waiter is the queue's head during the delay (Describe
shows it as holder, with delay_until), and is granted when the delay ends. Only tenants with a
lock_delay or max_lock_delay pay the extra reads and writes; others never reach this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

from lockbroker.server.core.backend import ANSWER_MARGIN, LockBackend, call_deadline
from lockbroker.server.core.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    LockHeld,
    NotAcquiredInfo,
    SessionLost,
    ShuttingDown,
    WaitExpired,
)
from lockbroker.server.core.model import Entry
from lockbroker.server.core.names import Keyspace, key_name, prefix_end
from lockbroker.server.core.quota import TenantQuota

MAX_ROUNDS = 64  # re-checks of one grant's delay (each sleeps until the delay it found ends)


def enabled(quota: TenantQuota) -> bool:
    """Whether grants of this tenant can carry a lock-delay (and so must be checked for one)."""
    return bool(quota.lock_delay or quota.max_lock_delay)


def delay_of(tenant: str, quota: TenantQuota, requested: float) -> float:
    """The lock-delay of a grant in seconds: the request's, at most the tenant's maximum (the
    larger of max_lock_delay and lock_delay), else the tenant's lock_delay."""
    limit = max(quota.max_lock_delay, quota.lock_delay)
    if requested > limit:
        raise InvalidArgument(
            [FieldViolation("lock_delay", f"{requested:g}s is above tenant {tenant!r}'s max_lock_delay of {limit:g}s")]
        )
    return requested or quota.lock_delay


def _prefix(ks: Keyspace, name: str) -> bytes:
    return ks.base + b"d/" + key_name(name) + b"#p"


def _key(ks: Keyspace, name: str, token: int) -> bytes:
    return _prefix(ks, name) + str(token).encode()


def _doc(raw: bytes) -> dict[str, float]:
    try:
        doc = json.loads(raw)
        return {k: float(v) for k, v in doc.items() if k in ("d", "u")}
    except (ValueError, TypeError, AttributeError):
        return {}


def _encode(doc: dict[str, float]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


async def remember(backend: LockBackend, ks: Keyspace, name: str, token: int, delay: float) -> None:
    """Record that grant `token` carries `delay`: kept until a clean release deletes it."""
    await backend.put_value(_key(ks, name, token), _encode({"d": delay}), 0)


async def start_now(backend: LockBackend, ks: Keyspace, name: str, token: int) -> float:
    """Grant `token` was just revoked: its delay (if any) starts now. The delay's end, or 0."""
    key = _key(ks, name, token)
    raw = await backend.get_value(key)
    doc = _doc(raw) if raw is not None else {}
    if not doc.get("d") or "u" in doc:
        return doc.get("u", 0.0)
    doc["u"] = time.time() + doc["d"]
    await backend.put_value(key, _encode(doc), 0)
    return doc["u"]


async def until(backend: LockBackend, ks: Keyspace, name: str, token: int, *, start: bool = True) -> float:
    """The end of the lock's running delay (unix seconds; 0: none), given that grant `token` heads
    the queue: every grant older than it is gone. start: start the delay of each lost grant not yet
    started (and delete delays that are over); without it (Describe) nothing is written and an
    unstarted delay is shown as starting now."""
    prefix = _prefix(ks, name)
    rows, _ = await backend.values(prefix, prefix_end(prefix), 0)
    now, end = time.time(), 0.0
    for key, raw, _lease in rows:
        try:
            lost = int(key[len(prefix) :])
        except ValueError:
            continue
        if lost >= token:
            continue  # this grant's own key (or a newer grant's): not a loss before it
        doc = _doc(raw)
        if "u" not in doc:
            # Older than the queue's head, so its entry is gone, and no clean release took the key.
            doc["u"] = now + doc.get("d", 0.0)
            if start:
                await backend.put_value(key, _encode(doc), 0)
        if doc["u"] <= now and start:
            await backend.delete_value(key)  # over: nothing else will read it
        end = max(end, doc["u"])
    return end if end > now else 0.0


async def hold_back(
    backend: LockBackend,
    ks: Keyspace,
    name: str,
    mine: Entry,
    *,
    wait: float,
    started: float,
    closing: asyncio.Future[None],
) -> None:
    """Return once the lock's delay (if any) is over and `mine`, the queue's head, still exists.

    Raises LockHeld (a try-lock), WaitExpired (the wait ends first), DeadlineExceeded (the RPC's
    deadline does), SessionLost (the entry went during the delay) or ShuttingDown; the caller
    removes the entry then, as for any Acquire that ends without a grant."""
    prefix = ks.lock_prefix(name)
    rpc_deadline = call_deadline.get()
    for _ in range(MAX_ROUNDS):
        end = await until(backend, ks, name, mine.create_revision)
        left = end - time.time()
        if left <= 0:
            return
        limit = started + wait
        if rpc_deadline is not None:
            limit = min(limit, rpc_deadline - ANSWER_MARGIN)
        budget = limit - time.monotonic()
        if budget <= 0:
            raise _not_yet(name, end, wait, started, rpc_deadline)
        if closing.done():
            raise ShuttingDown("the broker is shutting down", retry_after=0.5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(closing), min(left, budget))
        if closing.done():
            raise ShuttingDown("the broker is shutting down", retry_after=0.5)
        pos = await backend.position(prefix, mine.key, mine.create_revision)
        if pos.mine is None:
            raise SessionLost(f"the claim on {name!r} was removed during its lock-delay (the session ended)")
    raise _not_yet(name, time.time(), wait, started, rpc_deadline)


def _not_yet(name: str, end: float, wait: float, started: float, rpc_deadline: float | None) -> Exception:
    waited = time.monotonic() - started
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))
    info = NotAcquiredInfo(name, None, None, 0, waited)
    if wait <= 0:
        err: LockHeld | WaitExpired = LockHeld(f"lock {name!r} is in a lock-delay until {when}", info)
    elif rpc_deadline is not None and rpc_deadline - ANSWER_MARGIN < started + wait:
        return DeadlineExceeded(f"the RPC deadline passed during lock {name!r}'s lock-delay (until {when})")
    else:
        err = WaitExpired(f"gave up waiting for lock {name!r} after {waited:.3f}s: lock-delay until {when}", info)
    err.metadata["lock_delay_until"] = f"{end:.3f}"
    return err


async def before_grant(  # noqa: PLR0917 - the one hook in core/acquire.py, kept to one line there
    backend: LockBackend,
    tenant: str,
    quota: TenantQuota,
    ks: Keyspace,
    mine: Entry,
    name: str,
    requested: float,
    wait: float,
    started: float,
    closing: Callable[[], asyncio.Future[None]],
) -> None:
    """Just before `mine` (the queue's head) is granted: wait out a lost holder's delay, then
    record this grant's own. A no-op for tenants without lock-delay."""
    if not enabled(quota):
        return
    await hold_back(backend, ks, name, mine, wait=wait, started=started, closing=closing())
    delay = delay_of(tenant, quota, requested)
    if delay:
        await remember(backend, ks, name, mine.create_revision, delay)


async def release_cleanly(
    backend: LockBackend, ks: Keyspace, name: str, token: int, release: Callable[[], Awaitable[tuple[bool, int]]]
) -> tuple[bool, int]:
    """Run a Release of grant `token`, deleting its delay key first (a waiter the release hands the
    lock to must not find it), and putting it back if the grant is still there afterwards (the
    release failed, was refused, or only took a reentrant hold off)."""
    key = _key(ks, name, token)
    raw = await backend.get_value(key)
    if raw is None:
        return await release()
    await backend.delete_value(key)
    result: tuple[bool, int] | None = None
    try:
        result = await release()
        return result
    finally:
        if result is None or not result[0] or result[1] > 0:
            with contextlib.suppress(Exception):
                if await backend.find_entry(ks.lock_prefix(name), token) is not None:
                    await backend.put_value(key, raw, 0)


__all__ = ["before_grant", "delay_of", "enabled", "hold_back", "release_cleanly", "remember", "start_now", "until"]

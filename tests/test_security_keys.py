"""Issue 18, item 6: a flood of wrong API keys costs bounded work and tells nothing about key ids.

scrypt is replaced by a counting hook (the real function for the keys the test wants checked,
a gate that holds the others), so every assertion is about how many checks ran or waited,
never about how long anything took.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.identity import CredentialCheckBusy, IdentityInterceptor
from lockbroker.server.auth import tenants as t
from lockbroker.server.auth.tenants import ApiKeyRecord, Tenant, TenantRegistry, hash_key
from lockbroker.v1 import lock_pb2
from tests.interceptors.test_audit import rich, serving, stub, until

REAL_SCRYPT = hashlib.scrypt


class Scrypt:
    """Counts scrypt calls by password; holds every call for a password not in `fast` until `gate` opens."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.fast: set[bytes] = set()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.active = False  # off while the test builds its registry's real hashes

    def __call__(self, password: bytes, **kw: Any) -> bytes:
        if not self.active:
            return REAL_SCRYPT(password, **kw)
        with self._lock:
            self.calls.append(password)
        if password in self.fast:
            return REAL_SCRYPT(password, **kw)
        self.gate.wait(20)  # bounded: the test opens it
        return os.urandom(kw["dklen"])  # matches no stored digest

    def count(self, prefix: str) -> int:
        return sum(1 for c in self.calls if c.startswith(prefix.encode()))


@pytest.fixture
def scrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scrypt]:
    hook = Scrypt()
    monkeypatch.setattr(hashlib, "scrypt", hook)
    try:
        yield hook
    finally:
        hook.gate.set()


def _registry(hook: Scrypt, **options: Any) -> tuple[TenantRegistry, str, str]:
    a_id, a_key = t.new_key()
    b_id, b_key = t.new_key()
    tenants = [
        Tenant("acme", False, (ApiKeyRecord(a_id, hash_key(a_key), ""),)),
        Tenant("other", False, (ApiKeyRecord(b_id, hash_key(b_key), ""),)),
    ]
    hook.active = True
    return TenantRegistry(tenants, **options), a_key, b_key


def _wrong(key: str, i: int) -> str:
    key_id = key.split("_")[1]
    return f"lbk_{key_id}_{i:043d}"


async def _drained(reg: TenantRegistry) -> None:
    await until(lambda: reg.checks.running == 0 and reg.checks.queued == 0, timeout=20)


async def test_item6_a_wrong_secret_flood_costs_bounded_scrypts_and_queues_nothing_ahead_of_another_tenant(
    scrypt: Scrypt,
) -> None:
    reg, acme_key, other_key = _registry(scrypt)  # real hashes, made before the hook
    scrypt.fast.add(other_key.encode())
    acme_id = acme_key.split("_")[1]
    n = 200

    async def attempt(i: int) -> Any:
        # A short deadline, as the campaign's 2 s; the caller then goes away.
        return await asyncio.wait_for(reg.authenticate_key(_wrong(acme_key, i)), 0.2)

    outcomes = await asyncio.gather(*(attempt(i) for i in range(n)), return_exceptions=True)
    busy = sum(isinstance(o, CredentialCheckBusy) for o in outcomes)
    timed_out = sum(isinstance(o, asyncio.TimeoutError) for o in outcomes)
    assert busy + timed_out == n
    # While the flood's checks are still held, another tenant's uncached key is checked and
    # accepted (before the fix it sat behind 4 held slots and 196 queued checks, and this guard,
    # which is not a timing, ran out).
    principal = await asyncio.wait_for(reg.authenticate_key(other_key), 15)
    assert principal is not None and principal.tenant == "other"
    assert not scrypt.gate.is_set()
    # Nothing of the flood is queued ahead of anyone: it holds at most per_key_id slots.
    assert reg.checks.queued == 0
    assert reg.checks.running <= reg.checks.per_key_id < reg.checks.concurrency
    scrypt.gate.set()
    await _drained(reg)
    # The flood cost at most per_key_id scrypts (before the fix: one per call, 200, long after
    # every caller had given up).
    assert scrypt.count(f"lbk_{acme_id}_") <= reg.checks.per_key_id
    assert reg.checks.stats.hashed <= reg.checks.per_key_id + 1


async def test_item6_wrong_id_and_wrong_secret_cost_the_same(scrypt: Scrypt) -> None:
    reg, acme_key, _ = _registry(scrypt)
    scrypt.gate.set()  # every check answers at once (and wrongly)
    wrong_secret = _wrong(acme_key, 1)
    unknown_id = f"lbk_00c0ffee00_{'7' * 43}"
    for key in (wrong_secret, unknown_id):
        assert await reg.authenticate_key(key) is None
    # One scrypt each: an unknown id is checked against a dummy hash, so neither the latency nor
    # the work tells which ids exist (before the fix the unknown id cost none).
    assert (scrypt.count(wrong_secret), scrypt.count(unknown_id)) == (1, 1)
    # And both failures are remembered the same way.
    for key in (wrong_secret, unknown_id, wrong_secret, unknown_id):
        assert await reg.authenticate_key(key) is None
    assert (scrypt.count(wrong_secret), scrypt.count(unknown_id)) == (1, 1)
    assert reg.checks.stats.cached_failures == 4
    # A malformed key is refused without any: the format is public.
    assert await reg.authenticate_key("lbk_x") is None
    assert len(scrypt.calls) == 2


async def test_item6_work_whose_caller_is_gone_is_dropped_before_and_after_queueing(scrypt: Scrypt) -> None:
    reg, acme_key, other_key = _registry(scrypt, max_concurrent_verifications=1)
    # Gone before queueing: nothing is queued or hashed.
    with pytest.raises(asyncio.CancelledError):
        await reg.authenticate_key(_wrong(acme_key, 1), alive=lambda: False)
    assert reg.checks.queued == 0 and scrypt.calls == []
    # Gone while queued: the only slot is held; the next check waits, its caller leaves, and the
    # check is dropped unhashed when the slot frees up.
    holder = asyncio.ensure_future(reg.authenticate_key(_wrong(acme_key, 2)))
    await until(lambda: len(scrypt.calls) == 1)
    here = [True]
    waiting = asyncio.ensure_future(reg.authenticate_key(other_key, alive=lambda: here[0]))
    await until(lambda: reg.checks.queued == 1)
    here[0] = False  # its deadline passed; grpc has not cancelled the call yet
    scrypt.gate.set()
    assert await holder is None
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await _drained(reg)
    assert len(scrypt.calls) == 1 and reg.checks.stats.dropped == 1
    # A cancelled caller (grpc's cancellation of a call) withdraws its queued check the same way.
    scrypt.gate.clear()
    holder = asyncio.ensure_future(reg.authenticate_key(_wrong(acme_key, 3)))
    await until(lambda: len(scrypt.calls) == 2)
    waiting = asyncio.ensure_future(reg.authenticate_key(other_key))
    await until(lambda: reg.checks.queued == 1)
    waiting.cancel()
    await until(lambda: reg.checks.queued == 0)
    scrypt.gate.set()
    await holder
    await _drained(reg)
    assert len(scrypt.calls) == 2 and reg.checks.stats.dropped == 2


async def test_item6_a_full_queue_is_a_retryable_rate_limit_and_is_audited(scrypt: Scrypt) -> None:
    reg, acme_key, _ = _registry(scrypt, per_key_id_verifications=1)
    sink = MemorySink()
    log = AuditLog([sink])
    identity = IdentityInterceptor(reg)
    request = lock_pb2.AcquireRequest(name="a", session_id="s-1", owner="ok", request_id="r-6")
    async with serving([AuditInterceptor(log), identity]) as srv, aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        held = asyncio.ensure_future(stub(ch).Acquire(request, metadata=(("x-api-key", _wrong(acme_key, 1)),)))
        await until(lambda: len(scrypt.calls) == 1)
        with pytest.raises(aio.AioRpcError) as err:
            await stub(ch).Acquire(request, metadata=(("x-api-key", _wrong(acme_key, 2)),), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rich(err.value) == ("RATE_LIMITED", 1.0)
        assert len(scrypt.calls) == 1  # nothing was hashed for it
        scrypt.gate.set()
        with pytest.raises(aio.AioRpcError) as first:
            await held
        assert first.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await until(lambda: len(sink.lines) == 2)
    await log.close()
    reasons = sorted(r["outcome"]["reason"] for r in sink.records())
    assert reasons == ["RATE_LIMITED", "UNAUTHENTICATED"]
    assert all(r["credential"]["apiKeyId"] == acme_key.split("_")[1] for r in sink.records())

"""Bounded API key checks: what a flood of wrong keys can cost, and what it cannot tell.

An API key check costs one scrypt (tens of milliseconds of CPU and 16 MiB in a worker thread).
Before this module, wrong secrets for one known key id queued one check each in a single FIFO,
shielded from their callers: 1,000 such calls with a 2 s deadline cost 29.5 CPU-seconds and kept
another tenant's first call waiting 14 s (issue 18, item 6). Unknown ids were rejected without
hashing, so the answer's latency (1-3 ms against 65-75 ms) told which key ids exist.

The bounds, all per registry (per broker replica):

* **Caches.** A key that passed is remembered (`cache_ttl`, LRU `cache_size`); so is a key that
  failed (`failed_ttl`, LRU `failed_size`), by the SHA-256 of the whole key (id and secret), so
  a client retrying with a revoked or mistyped key costs one scrypt per `failed_ttl`.
* **Concurrency.** At most `concurrency` scrypts run at once, and at most `per_key_id` checks for
  one key id are queued or running: a flood on one key id holds at most that many of the slots,
  so another key id's check has none of the flood's checks queued ahead of it (defaults 4 and
  2). At most `max_queued` checks wait in all.
  A check that cannot be queued raises `CredentialCheckBusy`, which the caller gets as
  RESOURCE_EXHAUSTED / RATE_LIMITED with a RetryInfo: nothing is hashed for it.
* **Abandoned work.** A check is queued only for a caller that is still there, and one whose
  callers all left (cancelled, or past their deadline) before it started is dropped unhashed.
  Concurrent calls with the same key share one check.
* **No timing oracle.** A well-formed key with an unknown id runs the same queueing and one
  scrypt against a dummy hash with the default parameters, and its failure is cached the same
  way, so wrong-id and wrong-secret answers take the same time. (A key whose hash uses other
  scrypt parameters than the defaults takes a different time to check; keys the `lockbroker
  tenants` commands create all use the defaults.) A malformed key is refused at once: the key
  format is public, so that says nothing about the registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lockbroker.interceptors.identity import CredentialCheckBusy
from lockbroker.interceptors.principal import Principal

log = logging.getLogger("lockbroker.auth")

V = TypeVar("V")


@dataclass(slots=True)
class Expiring(Generic[V]):
    """digest -> value, LRU-bounded to `size` entries, each kept `ttl` seconds. No plaintext key is
    kept: the map key is the key's SHA-256."""

    ttl: float
    size: int
    _entries: OrderedDict[bytes, tuple[float, V]] = field(default_factory=OrderedDict)

    def get(self, digest: bytes) -> V | None:
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return hit[1]

    def put(self, digest: bytes, value: V) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries[digest] = (time.monotonic() + self.ttl, value)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class CheckStats:
    """Counters, for tests and operators: every number here is bounded by the settings above."""

    hashed: int = 0  # scrypts started
    cached_failures: int = 0  # answered from the failure cache
    busy: int = 0  # refused: the per-key-id or the global queue was full
    dropped: int = 0  # queued, then dropped unhashed because every caller had left


@dataclass(eq=False, slots=True)
class _Check:
    key: str
    key_id: str
    digest: bytes
    done: asyncio.Future[Principal | None]
    alive: list[Callable[[], bool]] = field(default_factory=list)
    waiters: int = 0
    started: bool = False


class KeyChecker:
    """Runs `verify(key)` (one blocking scrypt, uniform for known and unknown ids) under the bounds
    in the module docstring."""

    def __init__(
        self,
        verify: Callable[[str], Principal | None],
        *,
        cache_ttl: float = 30.0,
        cache_size: int = 1024,
        failed_ttl: float = 60.0,
        failed_size: int = 4096,
        concurrency: int = 4,
        per_key_id: int = 2,
        max_queued: int = 32,
        retry_after: float = 1.0,
    ) -> None:
        self._verify = verify
        self.valid: Expiring[Principal] = Expiring(cache_ttl, cache_size)
        self.failed: Expiring[bool] = Expiring(failed_ttl, failed_size)
        self.concurrency = max(1, concurrency)
        self.per_key_id = max(1, per_key_id)
        self.max_queued = max(0, max_queued)
        self.retry_after = retry_after
        self.stats = CheckStats()
        self._checks: dict[bytes, _Check] = {}  # by digest: one check per distinct key
        self._queue: deque[_Check] = deque()
        self._per_id: dict[str, int] = {}  # checks queued or running, by key id
        self._running: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        """Checks waiting for a slot (not yet hashing)."""
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    async def check(self, key: str, key_id: str, alive: Callable[[], bool] | None = None) -> Principal | None:
        """The principal of a well-formed key, or None. Raises CredentialCheckBusy when the key's
        check cannot be queued, and CancelledError when the caller is gone before it is hashed."""
        digest = hashlib.sha256(key.encode("ascii")).digest()
        if (hit := self.valid.get(digest)) is not None:
            return hit
        if self.failed.get(digest) is not None:
            self.stats.cached_failures += 1
            return None
        if alive is not None and not alive():
            raise asyncio.CancelledError  # the caller's deadline passed: queue nothing for it
        check = self._checks.get(digest)
        if check is None:
            check = self._enqueue(key, key_id, digest)
        if alive is not None:
            check.alive.append(alive)
        check.waiters += 1
        try:
            # Shielded: one caller leaving must not cancel the check the others wait for.
            return await asyncio.shield(check.done)
        finally:
            check.waiters -= 1
            if check.waiters == 0 and not check.started:
                self._drop(check)

    def _enqueue(self, key: str, key_id: str, digest: bytes) -> _Check:
        if self._per_id.get(key_id, 0) >= self.per_key_id or len(self._queue) >= self.max_queued:
            self.stats.busy += 1
            raise CredentialCheckBusy(self.retry_after)
        check = _Check(key, key_id, digest, asyncio.get_running_loop().create_future())
        self._checks[digest] = check
        self._per_id[key_id] = self._per_id.get(key_id, 0) + 1
        self._queue.append(check)
        # Started on the next loop turn, not now: a caller must be waiting on it first.
        asyncio.get_running_loop().call_soon(self._pump)
        return check

    def _release(self, check: _Check) -> None:
        self._checks.pop(check.digest, None)
        left = self._per_id.get(check.key_id, 0) - 1
        if left > 0:
            self._per_id[check.key_id] = left
        else:
            self._per_id.pop(check.key_id, None)

    def _drop(self, check: _Check) -> None:
        """Every caller left before the check started: forget it, unhashed."""
        try:
            self._queue.remove(check)
        except ValueError:
            return  # already started or dropped
        self._release(check)
        self.stats.dropped += 1
        if not check.done.done():
            check.done.cancel()

    def _pump(self) -> None:
        while len(self._running) < self.concurrency and self._queue:
            check = self._queue.popleft()
            if check.alive and not any(alive() for alive in check.alive):
                # Its callers are past their deadline; grpc cancels them any moment now.
                self._release(check)
                self.stats.dropped += 1
                check.done.cancel()
                continue
            check.started = True
            self.stats.hashed += 1
            task = asyncio.get_running_loop().create_task(self._run(check))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, check: _Check) -> None:
        principal: Principal | None = None
        checked = False
        try:
            principal = await asyncio.get_running_loop().run_in_executor(None, self._verify, check.key)
            checked = True
        except Exception:
            log.exception("api key check failed")
        finally:
            self._release(check)
            if principal is not None:
                self.valid.put(check.digest, principal)
            elif checked:  # a check that broke says nothing about the key: not remembered as wrong
                self.failed.put(check.digest, True)
            if not check.done.done():
                check.done.set_result(principal)
            # This task's slot is free now, not when its done callback runs.
            self._running.discard(asyncio.current_task())
            self._pump()

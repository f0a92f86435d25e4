"""Group commit: the write Txns of concurrent calls go to etcd as one Txn when that is safe.

While no commit of this broker is in flight, a Txn is sent at once, from its caller's task: one
call alone never waits for a batch (no timers). Txns that arrive while a commit is in flight queue
up; when a commit ends, the queue is sent as few Txns as it can be: an outer Txn with no compares
whose success ops are the members' own Txns (`RequestOp.request_txn`, etcd 3.3+), each with its
own compares and its own `succeeded` in the response. etcd applies the outer Txn at one revision,
so:

- two members of one batch never touch the same key or the same lock: each member names its
  "conflict keys" (its lock's prefix, and every key it writes, compares or reads), and a batch
  only takes members whose keys are disjoint from those already in it. Fencing tokens are create
  revisions: two entries of one lock in one Txn would tie. It also keeps etcd's "duplicate key"
  refusal away, and makes each member's reads of its own keys exact at the batch's revision.
- a batch stays within etcd's --max-txn-ops (default 128; counted generously, nested ops included)
  and well under --max-request-bytes.

Each member gets its own response (its nested response with the batch's header). When etcd
refuses the batch as a whole (a member's lease is gone, "duplicate key", too many ops), nothing
was applied, so each member is sent again alone and gets its own answer. When the batch's RPC
fails after it was sent, each member gets `Unavailable(outcome_unknown=True)`, exactly as a single
write would, and its caller resolves it by reading. Reads are never batched.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from opentelemetry.instrumentation.utils import suppress_instrumentation

from lockbroker.server.core.backend import remaining
from lockbroker.server.core.errors import BackendNoSpace, Unavailable
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd.client import EtcdClient, Stubs

# What a write hears when it waited its whole budget behind commits in flight, never sent.
QUEUED_TOO_LONG = "etcd is backed up: the write waited its whole time behind others and was not sent; retry"

# etcd's --max-txn-ops default. Each member counts as one op of the outer Txn plus every op it
# carries, which is more than etcd counts (it bounds each level's widest list), so a batch that
# fits here fits any etcd started with the default.
MAX_TXN_OPS = 128
# etcd's --max-request-bytes default is 1.5 MiB; a batch stops well short of it.
MAX_BATCH_BYTES = 512 * 1024


@dataclass(eq=False, slots=True)
class _Member:
    request: pb.TxnRequest
    keys: frozenset[bytes]
    ops: int
    size: int
    deadline: float  # monotonic; the batch's RPC is bounded by the latest of its members'
    done: asyncio.Future[pb.TxnResponse]
    sent: bool = False


@dataclass(eq=False, slots=True)
class _Batch:
    members: list[_Member] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    ops: int = 0
    size: int = 0


def _ops(request: pb.TxnRequest) -> int:
    return 1 + len(request.compare) + len(request.success) + len(request.failure)


class TxnBatcher:
    """Sends write Txns for EtcdLockBackend; see the module docstring.

    enabled=False sends every Txn alone (the behaviour before group commit). Counters for tests
    and benchmarks: `commits` (Txn RPCs sent), `batches` (of them, batches of 2+ members),
    `batched` (members sent in batches), `refused` (batches refused as a whole and re-sent alone)."""

    def __init__(
        self,
        client: EtcdClient,
        *,
        enabled: bool = True,
        max_ops: int = MAX_TXN_OPS,
        max_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._client = client
        self.enabled = enabled
        self._max_ops = max_ops
        self._max_bytes = max_bytes
        self._queue: list[_Member] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.commits = 0
        self.batches = 0
        self.batched = 0
        self.refused = 0
        client.after_txn = self._after_commit

    def txn(self, request: pb.TxnRequest, keys: Iterable[bytes], *, urgent: bool = False) -> Awaitable[pb.TxnResponse]:
        """Commit `request` (a write), alone or in a batch; `keys`: its conflict keys.

        Not async: with no commit in flight it hands back the client's own call, sent at once
        from the caller's task (no added latency, and no frame on the Acquire path). The client
        counts write Txns in flight and calls `_after_commit` as each ends.

        urgent: never held back behind a commit in flight; sent now, taking what has queued
        along. For a release: the next holder waits on it, and on a busy lock the Txn in flight
        is most often the previous holder queueing again, which it could not share a batch with."""
        client = self._client
        if not client.txns_in_flight or not self.enabled:
            self.commits += 1
            return client.call(_kv_txn, request, write=True)
        return self._queued(request, keys, urgent)

    def _after_commit(self) -> None:
        if self._queue:
            self._flush()

    async def _queued(self, request: pb.TxnRequest, keys: Iterable[bytes], urgent: bool) -> pb.TxnResponse:
        budget = remaining(self._client.request_timeout)
        if budget <= 0:
            raise Unavailable("the request's deadline passed before etcd was called", retry_after=0.0)
        member = _Member(
            request,
            frozenset(keys),
            _ops(request),
            request.ByteSize(),
            time.monotonic() + budget,
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(member)
        if urgent:
            self._flush()
        try:
            async with asyncio.timeout(budget):
                return await member.done
        except TimeoutError:
            if member.sent:
                raise Unavailable("etcd did not answer in time; retry", retry_after=1.0, outcome_unknown=True) from None
            # Never sent: the flush skips a member whose future is done (cancelled by the timeout).
            # etcd was not asked: the broker's own queue of writes was longer than the budget (an
            # overloaded broker or a slow etcd). Saying so tells the caller nothing was applied,
            # and an operator where the time went.
            raise Unavailable(QUEUED_TOO_LONG, retry_after=1.0) from None
        finally:
            if member.done.done() and not member.done.cancelled():
                member.done.exception()  # retrieved: a caller cancelled after its batch answered

    # -- batches ----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what queued while commits were in flight, as few batches as the rules allow."""
        queue, self._queue = self._queue, []
        batches: list[_Batch] = []
        for m in queue:
            if m.done.done():
                continue  # its caller gave up before it was sent
            for b in batches:
                if b.ops + m.ops <= self._max_ops and b.size + m.size <= self._max_bytes and b.keys.isdisjoint(m.keys):
                    break
            else:
                b = _Batch()
                batches.append(b)
            b.members.append(m)
            b.keys |= m.keys
            b.ops += m.ops
            b.size += m.size
            m.sent = True
        for b in batches:
            # A context of its own: the batch belongs to no one caller (its trace, its deadline).
            task = asyncio.get_running_loop().create_task(self._send(b.members), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, members: list[_Member]) -> None:
        # No CLIENT span: in this task's empty context it would start a trace of its own for
        # every batch. The members' traces show their calls' time; a span with links to each
        # member's span would be the way to show the batch itself.
        with suppress_instrumentation():
            if len(members) == 1:
                await self._alone(members[0])
            else:
                await self._together(members)

    async def _alone(self, m: _Member) -> None:
        self.commits += 1
        try:
            resp: pb.TxnResponse = await self._client.call(
                _kv_txn, m.request, write=True, timeout=m.deadline - time.monotonic()
            )
        except Exception as e:
            if not m.done.done():
                m.done.set_exception(e)
            return
        except BaseException:
            if not m.done.done():
                m.done.set_exception(_stopping())
            raise
        if not m.done.done():
            m.done.set_result(resp)

    async def _together(self, members: list[_Member]) -> None:
        outer = pb.TxnRequest(success=[pb.RequestOp(request_txn=m.request) for m in members])
        timeout = max(m.deadline for m in members) - time.monotonic()
        self.commits += 1
        self.batches += 1
        self.batched += len(members)
        try:
            resp: pb.TxnResponse = await self._client.call(_kv_txn, outer, write=True, timeout=timeout)
        except Unavailable as e:
            # Said of the batch, so of each member: unknown if the batch may have been applied.
            for m in members:
                if not m.done.done():
                    m.done.set_exception(_copy(e))
            return
        except Exception:
            # Refused as a whole, so applied to none: each member on its own gets its own answer.
            self.refused += 1
            await asyncio.gather(*(self._alone(m) for m in members))
            return
        except BaseException:
            for m in members:
                if not m.done.done():
                    m.done.set_exception(_stopping())
            raise
        for m, op in zip(members, resp.responses, strict=True):
            mine = op.response_txn
            # Every member was applied at the batch's revision (etcd fills only the outer header).
            mine.header.CopyFrom(resp.header)
            if not m.done.done():
                m.done.set_result(mine)

    async def close(self) -> None:
        queue, self._queue = self._queue, []
        for m in queue:
            if not m.done.done():
                m.done.set_exception(Unavailable("the broker is stopping; retry", retry_after=0.5))  # never sent
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _kv_txn(stubs: Stubs) -> Callable[..., Awaitable[pb.TxnResponse]]:
    return stubs.kv.Txn


def _copy(e: Unavailable) -> Unavailable:
    """The same error for another caller (one exception instance is raised in one task only)."""
    if isinstance(e, BackendNoSpace):
        return BackendNoSpace(e.retry_after)
    return Unavailable(str(e), retry_after=e.retry_after, outcome_unknown=e.outcome_unknown)


def _stopping() -> Unavailable:
    # The batch's task was cancelled (the broker is closing) with the RPC perhaps sent.
    return Unavailable("the broker is stopping; retry", retry_after=0.5, outcome_unknown=True)


__all__ = ["MAX_TXN_OPS", "TxnBatcher"]

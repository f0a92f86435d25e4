"""The setup every fault scenario shares: a 3-member etcd cluster, two broker replicas, recorded
clients spread over both, a fenced resource, and faults that are recorded as they are injected.

Used by tests/fault/test_faults.py (one harness per test) and by the soak command.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from lockbroker.server.core.model import EntryValue
from lockbroker.server.core.names import Keyspace, prefix_end, session_id_of
from lockbroker.server.etcd import rpc_pb2 as epb
from tests.etcdutil import EtcdProbe
from tests.fault.brokers import BrokerProcess
from tests.fault.checker import Limits, Report, check
from tests.fault.clients import FencedResource, LockClient
from tests.fault.cluster import EtcdCluster
from tests.fault.history import History

KEY_ROOT = "/fault"
TENANT = "default"


class Harness:
    def __init__(self, base: Path, *, ttl: int = 3, seed: int | None = None, use_netns: bool | None = None) -> None:
        self.base = base
        self.ttl = ttl
        self.rng = random.Random(seed)
        self.cluster = EtcdCluster(base / "etcd", use_netns=use_netns)
        self.brokers: list[BrokerProcess] = []
        self.keyspace = Keyspace(KEY_ROOT, TENANT)
        self._monitor: asyncio.Task[None] | None = None
        self.clients: list[LockClient] = []
        self._history: History | None = None
        self.begin(base)

    @property
    def history(self) -> History:
        assert self._history is not None
        return self._history

    def begin(self, where: Path) -> None:
        """Start a new history (and fenced resource) in `where`; the cluster and brokers stay."""
        if self._history is not None:
            self._history.close()
        where.mkdir(parents=True, exist_ok=True)
        self._history = History(where / "history.jsonl")
        self.resource = FencedResource(where / "resource.json")
        self.clients = []
        self._last_leader: tuple[int | None, int] | None = None
        self._log_marks = [b.log_size() for b in getattr(self, "brokers", [])]

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self.cluster.start()
            self.brokers = [
                BrokerProcess(f"r{i}", self.cluster.endpoints, KEY_ROOT, self.base / f"broker-r{i}.log")
                for i in range(2)
            ]
            await asyncio.gather(*(b.start() for b in self.brokers))
            self._log_marks = [b.log_size() for b in self.brokers]
            self._monitor = asyncio.create_task(self._watch_leader(), name="leader-monitor")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.shutdown()
        # Brokers first: nothing may dial the members' addresses once their network is gone.
        for b in self.brokers:
            await b.stop()
        await self.cluster.close()
        self.history.close()

    async def _watch_leader(self) -> None:
        while True:
            sts = await self.cluster.statuses()
            term = max((s.term for s in sts), default=0)
            leaders = [s.index for s in sts if s.is_leader and s.term == term]
            now = (leaders[0] if leaders else None, term)
            last = self._last_leader
            if now != last and (now[0] is not None or last is None or term > last[1]):
                self.history.leader(*now)
                self._last_leader = now
            await asyncio.sleep(0.2)

    # -- clients ---------------------------------------------------------------------------------

    def make_clients(
        self, n: int, *, call_timeout: float = 3.0, prefix: str = "c", ttl: int | None = None
    ) -> list[LockClient]:
        made = [
            LockClient(
                f"{prefix}{len(self.clients) + i}",
                self.history,
                [b.target for b in self.brokers],
                ttl=ttl or self.ttl,
                call_timeout=call_timeout,
                resource=self.resource,
                rng=random.Random(self.rng.random()),
                first=i,  # spread over both replicas
            )
            for i in range(n)
        ]
        self.clients += made
        return made

    async def workload(
        self,
        clients: Sequence[LockClient],
        locks: Sequence[str],
        *,
        before: float = 1.5,
        after: float = 2.5,
        fault: Callable[[], Awaitable[None]] | None = None,
        max_ops: int = 200,
        waits: Sequence[float] = (0.0, 1.0, 3.0),
        hold: tuple[float, float] = (0.05, 0.4),
        timeout: float = 90.0,
    ) -> None:
        """Run `clients` on `locks`: `before` seconds, then `fault` (injected and healed), then `after`."""
        stop = asyncio.Event()
        tasks = [asyncio.create_task(c.run(locks, stop, max_ops=max_ops, waits=waits, hold=hold)) for c in clients]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.sleep(before)
                if fault is not None:
                    await fault()
                await asyncio.sleep(after)
                stop.set()
                await asyncio.gather(*tasks)
        finally:
            stop.set()
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def finish(self, clients: Sequence[LockClient], *, lapse: float | None = None) -> None:
        """Record what etcd still holds now that `clients` released everything, then close their
        sessions and wait (up to `lapse`) until no key and no lease is left at all."""
        await self.record_entries()
        for c in clients:
            await c.close()
        lapse = lapse if lapse is not None else 3 * self.ttl + 10
        probe = await self.probe()
        try:
            deadline = time.monotonic() + lapse
            while True:
                keys, leases = await probe.keys(), await probe.leases()
                if not keys and not leases:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd still has {len(keys)} keys {keys[:5]} and leases {sorted(leases)[:5]}")
                await asyncio.sleep(0.2)
        finally:
            await probe.close()

    async def record_entries(self) -> list[tuple[str, int, str, str]]:
        probe = await self.probe()
        try:
            kvs = await probe.kvs("/t/default/l/")
        finally:
            await probe.close()
        found = []
        for kv in kvs:
            name = self.keyspace.name_of(kv.key)
            session = session_id_of(kv.lease)
            rid = EntryValue.decode(kv.value).request_id
            self.history.entry(name, kv.create_revision, session, rid)
            found.append((name, kv.create_revision, session, rid))
        return found

    async def probe(self) -> EtcdProbe:
        """A direct etcd connection, to the leader (which can always answer)."""
        leader = await self.cluster.wait_leader()
        return EtcdProbe(self.cluster.members[leader].client_url, KEY_ROOT)

    def check(self, limits: Limits | None = None) -> Report:
        return check(self.history.events, limits or Limits(per_leader_change=self.ttl + 3.0))

    # -- faults, recorded ------------------------------------------------------------------------

    async def leader(self) -> int:
        return await self.cluster.wait_leader()

    async def kill_member(self, index: int) -> None:
        self.history.nemesis("member_killed", member=index)
        self.cluster.kill(index)
        await self.cluster.reap(index)

    async def restart_member(self, index: int) -> None:
        await self.cluster.restart(index)
        self.history.nemesis("member_restarted", member=index)

    def pause_member(self, index: int) -> None:
        self.history.nemesis("member_paused", member=index)
        self.cluster.pause(index)

    def resume_member(self, index: int) -> None:
        self.cluster.resume(index)
        self.history.nemesis("member_resumed", member=index)

    async def cut_peers(self, index: int) -> None:
        self.history.nemesis("member_cut_from_peers", member=index)
        await self.cluster.cut_peers(index)

    async def isolate(self, index: int) -> None:
        self.history.nemesis("member_isolated", member=index)
        await self.cluster.isolate(index)

    async def heal(self, index: int) -> None:
        await self.cluster.heal(index)
        self.history.nemesis("member_healed", member=index)

    async def lose_quorum(self) -> list[int]:
        """SIGSTOP the leader and one follower: the last member can neither elect nor commit."""
        leader = await self.cluster.wait_leader()
        follower = next(i for i in range(self.cluster.size) if i != leader)
        self.history.nemesis("quorum_lost", members=[leader, follower])
        for i in (leader, follower):
            self.cluster.pause(i)
        return [leader, follower]

    def restore_quorum(self, members: Sequence[int]) -> None:
        for i in members:
            self.cluster.resume(i)
        self.history.nemesis("quorum_restored", members=list(members))

    def kill_broker(self, index: int) -> None:
        self.history.nemesis("broker_killed", broker=index)
        self.brokers[index].kill()

    async def restart_broker(self, index: int) -> None:
        await self.brokers[index].reap()
        await self.brokers[index].start()
        self.history.nemesis("broker_restarted", broker=index)

    async def repair(self) -> None:
        """Undo whatever faults a (failed) scenario left: every member running and connected,
        both brokers up, and no key or lease left under the broker's root."""
        for m in self.cluster.members:
            await self.cluster.heal(m.index)
            if m.paused:
                self.cluster.resume(m.index)
            if not m.running:
                await self.cluster.restart(m.index)
        for i, b in enumerate(self.brokers):
            if not b.running:
                await self.restart_broker(i)
        await self.settle()
        probe = await self.probe()
        try:
            for lease in await probe.leases():
                with contextlib.suppress(Exception):
                    await probe.revoke(lease)
            await probe.kv.DeleteRange(epb.DeleteRangeRequest(key=probe.root, range_end=prefix_end(probe.root)))
        finally:
            await probe.close()

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until every member is up, connected and following one leader."""
        await self.cluster.wait_ready(timeout)

    def incidents(self) -> list[dict[str, object]]:
        """INTERNAL answers the brokers logged since this history began."""
        return [e for b, since in zip(self.brokers, self._log_marks, strict=True) for e in b.incidents(since)]

    def broker_errors(self) -> list[dict[str, object]]:
        """Every error-level record the brokers logged since this history began."""
        return [e for b, since in zip(self.brokers, self._log_marks, strict=True) for e in b.records("error", since)]


__all__ = ["KEY_ROOT", "Harness"]

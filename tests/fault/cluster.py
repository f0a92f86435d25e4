"""A 3-member etcd cluster that the fault tests can break and heal.

Each member is its own etcd process with its own ports and data dir. As root (with iproute2) each
member also lives in its own network namespace, joined by a veth pair to a bridge in the root
namespace, so a member can be cut off from its peers (or from everyone) with `ip` alone: no
iptables is assumed. Without root the members share loopback and only process faults (kill,
SIGSTOP) are possible; under CI=true that fallback is refused, so the partition tests always run.

Only processes this module started are ever signalled, always by their own PID. Every namespace,
veth, bridge and route it creates carries this run's unique id and is deleted by `close()`, also
after a failed start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from grpc import aio

from lockbroker.server.embedded import _child_env, _with_parent_death_signal, find_etcd_binary, free_port
from lockbroker.server.etcd import rpc_pb2 as epb
from lockbroker.server.etcd import rpc_pb2_grpc as epb_grpc

HEARTBEAT_MS = 100
ELECTION_MS = 1000
CLIENT_PORT = 2379
PEER_PORT = 2380
# A member answers Status within this, or counts as unreachable for that poll.
STATUS_TIMEOUT = 0.5


class ClusterError(RuntimeError):
    pass


def ci() -> bool:
    return os.environ.get("CI") == "true"


def netns_problem() -> str | None:
    """Why member network namespaces cannot be used on this machine, or None if they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    return None


async def _run(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


# -- networks -----------------------------------------------------------------------------------


class LoopbackNetwork:
    """Every member on 127.0.0.1 with its own free ports: kill and pause only, no partitions."""

    partitions = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.hosts = ["127.0.0.1"] * size
        self.ports: list[tuple[int, int]] = []

    async def setup(self) -> None:
        taken: set[int] = set()
        for _ in range(self.size):
            pair: list[int] = []
            while len(pair) < 2:
                port = free_port()
                if port not in taken:
                    taken.add(port)
                    pair.append(port)
            self.ports.append((pair[0], pair[1]))

    def wrap(self, index: int, argv: list[str]) -> list[str]:
        return argv

    async def cut_peers(self, index: int) -> None:
        raise ClusterError("partitions need network namespaces (root and iproute2)")

    async def isolate(self, index: int) -> None:
        raise ClusterError("partitions need network namespaces (root and iproute2)")

    async def heal(self, index: int) -> None:
        return None

    async def teardown(self) -> None:
        return None


@dataclass
class NetnsNetwork:
    """One network namespace per member, each with a veth pair to a bridge in the root namespace.

    Names carry a random run id, so parallel runs never collide, and the subnet is a /24 that no
    address or route on this machine uses yet. The root namespace also gets an `unreachable` route
    for the subnet (with a high metric, so the bridge's own route wins while it exists): should the
    bridge vanish while something still dials a member, the packet is refused here instead of
    following the default route off the machine.
    """

    size: int
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    hosts: list[str] = field(default_factory=list)
    ports: list[tuple[int, int]] = field(default_factory=list)
    partitions: bool = True
    _created_ns: list[str] = field(default_factory=list)
    _bridge: bool = False
    _safety_route: bool = False
    _cuts: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    _down: set[int] = field(default_factory=set)

    @property
    def bridge(self) -> str:
        return f"lbf{self.run_id}br"

    def ns(self, index: int) -> str:
        return f"lbf{self.run_id}m{index}"

    def host_veth(self, index: int) -> str:
        return f"lbf{self.run_id}h{index}"

    def ns_veth(self, index: int) -> str:
        return f"lbf{self.run_id}n{index}"

    async def _free_subnet(self) -> ipaddress.IPv4Network:
        used: list[ipaddress.IPv4Network] = []
        text = await _run("ip", "-o", "-4", "addr", "show") + await _run("ip", "-4", "route", "show", "table", "all")
        for word in text.split():
            with contextlib.suppress(ValueError):
                if "/" in word or word.count(".") == 3:
                    used.append(ipaddress.ip_network(word, strict=False))  # type: ignore[arg-type]
        rng = random.SystemRandom()
        for _ in range(200):
            candidate = ipaddress.IPv4Network(f"10.{rng.randrange(200, 250)}.{rng.randrange(0, 256)}.0/24")
            if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
                return candidate
        raise ClusterError("no free 10.x /24 subnet for the member namespaces")

    async def setup(self) -> None:
        self.subnet = await self._free_subnet()
        net = self.subnet
        gateway = str(net[1])
        await _run("ip", "route", "add", "unreachable", str(net), "metric", "4242")
        self._safety_route = True
        await _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge = True
        await _run("ip", "addr", "add", f"{gateway}/{net.prefixlen}", "dev", self.bridge)
        await _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.size):
            ns, host_if, ns_if = self.ns(i), self.host_veth(i), self.ns_veth(i)
            address = str(net[11 + i])
            await _run("ip", "netns", "add", ns)
            self._created_ns.append(ns)
            await _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            await _run("ip", "link", "set", ns_if, "netns", ns)
            await _run("ip", "link", "set", host_if, "master", self.bridge)
            await _run("ip", "link", "set", host_if, "up")
            await _run("ip", "-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", ns_if)
            await _run("ip", "-n", ns, "link", "set", ns_if, "up")
            await _run("ip", "-n", ns, "link", "set", "lo", "up")
            self.hosts.append(address)
            self.ports.append((CLIENT_PORT, PEER_PORT))

    def wrap(self, index: int, argv: list[str]) -> list[str]:
        # The parent-death wrapper execs with execv, which does not search PATH.
        return [shutil.which("ip") or "ip", "netns", "exec", self.ns(index), *argv]

    async def cut_peers(self, index: int) -> None:
        """Drop all traffic between member `index` and its peers; clients still reach every member.

        A blackhole route per direction: the member's packets to each peer, and each peer's packets
        to the member, are discarded. Established TCP connections stall rather than reset, as on a
        real partition.
        """
        routes: list[tuple[str, str]] = []
        for j in range(self.size):
            if j == index:
                continue
            routes += [(self.ns(index), f"{self.hosts[j]}/32"), (self.ns(j), f"{self.hosts[index]}/32")]
        for ns, dest in routes:
            await _run("ip", "-n", ns, "route", "add", "blackhole", dest)
            self._cuts.setdefault(index, []).append((ns, dest))

    async def isolate(self, index: int) -> None:
        """Take the member's link to the bridge down: neither peers nor clients reach it."""
        await _run("ip", "link", "set", self.host_veth(index), "down")
        self._down.add(index)

    async def heal(self, index: int) -> None:
        for ns, dest in self._cuts.pop(index, []):
            await _run("ip", "-n", ns, "route", "del", "blackhole", dest, check=False)
        if index in self._down:
            await _run("ip", "link", "set", self.host_veth(index), "up")
            self._down.discard(index)

    async def teardown(self) -> None:
        """Delete everything setup() made, whatever state a failed test left it in."""
        errors: list[str] = []

        async def attempt(*argv: str) -> None:
            try:
                await _run(*argv)
            except ClusterError as e:
                errors.append(str(e))

        for i, ns in enumerate(self._created_ns):
            # Deleting a veth end deletes its peer too. Done explicitly because a namespace that a
            # process still lives in outlives `ip netns del`, and its veth with it.
            await _run("ip", "link", "del", self.host_veth(i), check=False)
            await attempt("ip", "netns", "del", ns)
        self._created_ns.clear()
        if self._bridge:
            await attempt("ip", "link", "del", self.bridge)
            self._bridge = False
        if self._safety_route and self.subnet is not None:
            await attempt("ip", "route", "del", "unreachable", str(self.subnet), "metric", "4242")
            self._safety_route = False
        self._cuts.clear()
        self._down.clear()
        if errors:
            raise ClusterError("teardown: " + "; ".join(errors))


# -- members ------------------------------------------------------------------------------------


@dataclass
class Member:
    index: int
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_file: Path
    proc: asyncio.subprocess.Process | None = None
    paused: bool = False
    member_id: int = 0

    @property
    def target(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.target}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None


@dataclass(frozen=True)
class MemberStatus:
    index: int
    member_id: int
    leader_id: int
    term: int

    @property
    def is_leader(self) -> bool:
        return self.leader_id != 0 and self.leader_id == self.member_id


class EtcdCluster:
    """`size` etcd members, started together, each killable, pausable and (with netns) partitionable."""

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        use_netns: bool | None = None,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
    ) -> None:
        """`use_netns`: None means "if this machine allows it"; under CI=true it must."""
        self.base_dir = base_dir
        self.size = size
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        problem = netns_problem()
        if use_netns is None:
            use_netns = problem is None or ci()
        if use_netns and problem is not None:
            raise ClusterError(f"network namespaces are required (CI=true) but unavailable: {problem}")
        self.network: NetnsNetwork | LoopbackNetwork = NetnsNetwork(size) if use_netns else LoopbackNetwork(size)
        self.members: list[Member] = []
        self.token = f"lbf-{secrets.token_hex(4)}"
        self._channels: dict[int, aio.Channel] = {}
        self._binary = find_etcd_binary()

    @property
    def partitions(self) -> bool:
        return self.network.partitions

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        try:
            await self.network.setup()
            for i in range(self.size):
                client_port, peer_port = self.network.ports[i]
                self.members.append(
                    Member(
                        i,
                        f"m{i}",
                        self.network.hosts[i],
                        client_port,
                        peer_port,
                        self.base_dir / f"m{i}.etcd",
                        self.base_dir / f"m{i}.log",
                    )
                )
            for m in self.members:
                await self._spawn(m)
            await self.wait_ready(timeout)
            for st in await self.statuses():
                self.members[st.index].member_id = st.member_id
            if len({m.member_id for m in self.members}) != self.size:
                raise ClusterError("could not learn every member's id")
        except BaseException:
            await self.close()
            raise

    def _args(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self._binary,
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            m.client_url,
            "--advertise-client-urls",
            m.client_url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",  # ignored once the data dir exists, so a restart rejoins as the same member
            "--initial-cluster-token",
            self.token,
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--pre-vote",
            "--logger=zap",
            "--log-level",
            "warn",
        ]

    async def _spawn(self, m: Member) -> None:
        m.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with m.log_file.open("ab") as log:
            m.proc = await asyncio.create_subprocess_exec(
                *_with_parent_death_signal(self.network.wrap(m.index, self._args(m))),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=_child_env(),
            )
        m.paused = False

    async def close(self) -> None:
        """Kill every member we started (continuing paused ones first), then delete the network."""
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        for m in self.members:
            if m.proc is not None and m.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGKILL)
                    if m.paused:
                        m.proc.send_signal(signal.SIGCONT)
            if m.proc is not None:
                await m.proc.wait()
            m.paused = False
        await self.network.teardown()

    # -- status ----------------------------------------------------------------------------------

    def _channel(self, index: int) -> aio.Channel:
        ch = self._channels.get(index)
        if ch is None:
            ch = self._channels[index] = aio.insecure_channel(
                self.members[index].target, options=[("grpc.initial_reconnect_backoff_ms", 100)]
            )
        return ch

    async def status(self, index: int, timeout: float = STATUS_TIMEOUT) -> MemberStatus | None:
        m = self.members[index]
        if not m.running or m.paused:
            return None
        try:
            resp = await epb_grpc.MaintenanceStub(self._channel(index)).Status(epb.StatusRequest(), timeout=timeout)
        except aio.AioRpcError:
            return None
        return MemberStatus(index, resp.header.member_id, resp.leader, resp.raftTerm)

    async def statuses(self) -> list[MemberStatus]:
        found = await asyncio.gather(*(self.status(i) for i in range(self.size)))
        return [s for s in found if s is not None]

    async def leader(self) -> int | None:
        """The member that calls itself leader at the highest term any member reports, if any."""
        sts = await self.statuses()
        leaders = [s for s in sts if s.is_leader]
        if not leaders:
            return None
        best = max(leaders, key=lambda s: s.term)
        if best.term < max(s.term for s in sts):
            return None  # an old leader that has not heard of the newer term yet
        return best.index

    async def term(self) -> int:
        sts = await self.statuses()
        return max((s.term for s in sts), default=0)

    async def wait_leader(self, timeout: float = 20.0, *, not_: int | None = None) -> int:
        """Wait for a leader that a majority of members follow (itself included), other than `not_`.

        A majority, not every member: a member cut off from its peers may still name no leader,
        or its old one.
        """
        deadline = time.monotonic() + timeout
        while True:
            sts = await self.statuses()
            for st in sts:
                if not st.is_leader or st.index == not_:
                    continue
                followers = [s for s in sts if s.leader_id == st.member_id and s.term == st.term]
                if len(followers) > self.size // 2:
                    return st.index
            if time.monotonic() > deadline:
                raise ClusterError(f"no leader with a majority within {timeout:g}s (statuses: {sts})")
            await asyncio.sleep(0.1)

    async def wait_ready(self, timeout: float = 30.0) -> int:
        """Every member running, answering, and agreeing on one leader."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if m.proc is not None and m.proc.returncode is not None:
                    raise ClusterError(f"etcd member {m.name} exited with {m.proc.returncode}; see {m.log_file}")
            sts = await self.statuses()
            ids = {s.leader_id for s in sts}
            if len(sts) == self.size and len(ids) == 1 and 0 not in ids:
                return await self.wait_leader(max(1.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise ClusterError(f"cluster not ready within {timeout:g}s (statuses: {sts})")
            await asyncio.sleep(0.1)

    async def open_streams(self, index: int, method: str = "LeaseKeepAlive") -> int:
        """How many `method` streams are open on member `index`, from its /metrics (started minus
        handled); 0 if it does not answer. The brokers' shared streams are the only ones."""
        m = self.members[index]
        if not m.running or m.paused:
            return 0

        def read() -> str:
            with urllib.request.urlopen(f"{m.client_url}/metrics", timeout=STATUS_TIMEOUT * 2) as r:
                return str(r.read().decode())

        try:
            text = await asyncio.to_thread(read)
        except OSError:
            return 0
        started = handled = 0.0
        for line in text.splitlines():
            if f'grpc_method="{method}"' not in line or line.startswith("#"):
                continue
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("grpc_server_started_total"):
                started += value
            elif line.startswith("grpc_server_handled_total"):
                handled += value
        return int(started - handled)

    async def move_leader(self, target: int, timeout: float = 10.0) -> None:
        """Hand leadership to member `target` (etcd's MoveLeader, through its JSON gateway)."""
        leader = await self.wait_leader()
        if leader == target:
            return
        url = f"{self.members[leader].client_url}/v3/maintenance/transfer-leadership"
        body = json.dumps({"targetID": str(self.members[target].member_id)}).encode()

        def post() -> None:
            request = urllib.request.Request(url, data=body, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as r:
                r.read()

        await asyncio.to_thread(post)
        deadline = time.monotonic() + timeout
        while await self.leader() != target:
            if time.monotonic() > deadline:
                raise ClusterError(f"leadership did not move to m{target} within {timeout:g}s")
            await asyncio.sleep(0.1)

    # -- faults ----------------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL a member, as a crash would."""
        m = self.members[index]
        if m.proc is None or m.proc.returncode is not None:
            raise ClusterError(f"member {m.name} is not running")
        m.proc.send_signal(signal.SIGKILL)
        if m.paused:
            m.proc.send_signal(signal.SIGCONT)

    async def reap(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None:
            await m.proc.wait()
        m.paused = False

    async def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start a killed member again on its data dir and ports; return once it follows a leader."""
        m = self.members[index]
        if m.running:
            raise ClusterError(f"member {m.name} is still running")
        await self.reap(index)
        await self._spawn(m)
        deadline = time.monotonic() + timeout
        while True:
            if m.proc is not None and m.proc.returncode is not None:
                raise ClusterError(f"member {m.name} exited with {m.proc.returncode} on restart; see {m.log_file}")
            st = await self.status(index)
            if st is not None and st.leader_id != 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"member {m.name} did not rejoin within {timeout:g}s")
            await asyncio.sleep(0.1)

    def pause(self, index: int) -> None:
        """SIGSTOP: the member keeps its connections open but answers nothing."""
        m = self.members[index]
        if not m.running or m.proc is None:
            raise ClusterError(f"member {m.name} is not running")
        m.proc.send_signal(signal.SIGSTOP)
        m.paused = True
        _wait_stopped(m.proc.pid)

    def resume(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None and m.running:
            m.proc.send_signal(signal.SIGCONT)
        m.paused = False

    async def cut_peers(self, index: int) -> None:
        await self.network.cut_peers(index)

    async def isolate(self, index: int) -> None:
        await self.network.isolate(index)

    async def heal(self, index: int) -> None:
        await self.network.heal(index)


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """Until the kernel shows `pid` stopped: SIGSTOP is delivered asynchronously, and a member
    that still ran for a moment answered a read the test meant for a frozen one (CI, once)."""
    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        try:
            # The state follows the command name, which is in parentheses and may hold spaces.
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # no /proc (or the process is gone): nothing more to wait for
        if state in ("T", "t"):
            return
        time.sleep(0.001)


__all__ = ["ELECTION_MS", "HEARTBEAT_MS", "ClusterError", "EtcdCluster", "Member", "MemberStatus", "netns_problem"]

"""Issue 18, item 12: silent connections cannot starve the broker of descriptors or clients.

The broker raises its open-files soft limit to the hard limit, caps the connections open at once,
closes connections that never complete their handshake after `handshake_timeout`, and sends a
GOAWAY to connections without calls after `connection_idle`. Bounded loops, a few hundred
sockets at most, no timing asserted beyond "within a generous bound".
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
from pathlib import Path

import grpc
from grpc import aio

from lockbroker.server.embedded import free_port
from lockbroker.v1 import lock_pb2, lock_pb2_grpc
from tests.abuse_util import served
from tests.procutil import clean_env, lockbroker_command, stop_process

SILENT = 150
CAP = 40
BOUND = 20.0  # seconds: far above the 1 s handshake and idle timeouts used here


async def _closed_by_peer(sock: socket.socket, loop: asyncio.AbstractEventLoop, timeout: float) -> bool:
    """True if the server closes `sock` (EOF or reset) within `timeout`."""
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    while data:  # a closing HTTP/2 server may send its SETTINGS/GOAWAY first: read to the end
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
        except TimeoutError:
            return False
        except OSError:
            return True
    return True


async def test_silent_connections_are_capped_and_reaped_and_a_new_client_is_served(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with served(tmp_path, max_connections=CAP, handshake_timeout=1.0, connection_idle=1.0) as s:
        socks = []
        try:
            for _ in range(SILENT):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", s.broker.port))
                socks.append(sock)
            # A new client arriving now is served: its call waits (wait_for_ready) until the
            # silent ones are reaped, well within its deadline.
            async with aio.insecure_channel(s.target) as ch:
                stub = lock_pb2_grpc.LockServiceStub(ch)
                resp = await stub.Describe(
                    lock_pb2.DescribeRequest(name="x"), metadata=s.md("calm"), timeout=BOUND, wait_for_ready=True
                )
                assert resp.name == "x"
            # Every silent connection was closed by the server: past the cap at once, the others
            # when their handshake time ran out.
            closed = await asyncio.gather(*(_closed_by_peer(sock, loop, BOUND) for sock in socks))
            assert all(closed), f"{closed.count(False)} of {SILENT} silent connections still open"
        finally:
            for sock in socks:
                sock.close()

        # A connection that made a call and then has none is sent away after connection_idle.
        async with aio.insecure_channel(s.target) as ch:
            stub = lock_pb2_grpc.LockServiceStub(ch)
            await stub.Describe(lock_pb2.DescribeRequest(name="y"), metadata=s.md("calm"), timeout=BOUND)
            assert ch.get_state() == grpc.ChannelConnectivity.READY
            state = ch.get_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BOUND):
                    while state == grpc.ChannelConnectivity.READY:
                        await ch.wait_for_state_change(state)
                        state = ch.get_state()
            assert state != grpc.ChannelConnectivity.READY, "an idle connection was kept open"
            # And the client simply reconnects for its next call.
            await stub.Describe(lock_pb2.DescribeRequest(name="y"), metadata=s.md("calm"), timeout=BOUND)


async def test_connections_past_the_cap_are_closed_as_they_arrive(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    # A long handshake timeout: only the cap can close anything during this test.
    async with served(tmp_path, max_connections=CAP, handshake_timeout=300.0) as s:
        socks = []
        try:
            for _ in range(SILENT):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", s.broker.port))
                socks.append(sock)
            closed = await asyncio.gather(*(_closed_by_peer(sock, loop, 5.0) for sock in socks))
            assert closed.count(True) >= SILENT - CAP, closed.count(True)
            assert closed.count(False) >= 1, "the connections within the cap were closed too"
        finally:
            for sock in socks:
                sock.close()


def _soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    m = re.search(r"Max open files\s+(\d+)\s+(\d+|unlimited)", text)
    assert m, text
    return int(m.group(1))


async def test_serve_raises_its_open_files_limit_and_says_so(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 512:
        raise AssertionError(f"this machine's hard open-files limit ({hard}) leaves nothing to raise")

    def low_soft_limit() -> None:  # in the child, before exec: as a distribution's 1,024 default would
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        "serve",
        "--backend",
        "memory",
        "--listen",
        f"127.0.0.1:{port}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=clean_env(),
        preexec_fn=low_soft_limit,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "serve exited:\n" + "".join(seen)
                seen.append(line)
                if "lockbroker serving" in line:
                    break
        text = "".join(seen)
        assert "raised the open-files limit" in text, text
        assert _soft_limit(proc.pid) > 512
        if hard != resource.RLIM_INFINITY:
            assert _soft_limit(proc.pid) == hard
    finally:
        await stop_process(proc)

"""The lock context manager when its broker is killed (-9) while the block runs.

The session's lease lives in etcd, not in the broker: nobody can confirm it any more, so the
client must stop believing it holds the lock at its last confirmed expiry (`lost` fires, `check()`
raises), leave the block without hanging, and the lock frees itself in etcd when the TTL runs out.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from lockbroker.client import Client, LockLost
from lockbroker.server.embedded import EmbeddedEtcd, free_port
from tests.etcdutil import EtcdProbe
from tests.lockutil import eventually
from tests.procutil import clean_env, lockbroker_command, stop_process


async def test_killed_broker_mid_block_marks_the_lock_lost_and_etcd_frees_it(
    etcd: EmbeddedEtcd, key_root: str, probe: EtcdProbe, tmp_path: Path
) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *lockbroker_command(),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--etcd-endpoints",
        etcd.endpoint,
        "--etcd-key-root",
        key_root,
        env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(tmp_path / "broker.log").open("wb"),
    )
    try:
        async with Client(f"127.0.0.1:{port}", default_timeout=3.0) as client:
            await asyncio.wait_for(client.channel.channel_ready(), 20)
            ran_past_expiry = False
            with pytest.raises(LockLost):
                async with client.lock("killed/1", ttl=3, wait=5) as held:
                    assert len(await probe.keys("/t/default/l/")) == 1
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    deadline = held.deadline
                    # Nobody can refresh the session now: lost fires by the last confirmed expiry.
                    await asyncio.wait_for(held.lost.wait(), 3 + 1)
                    assert time.monotonic() >= deadline - 0.05
                    ran_past_expiry = True
                    held.check()  # raises LockLost: the code below must never run unlocked
                    raise AssertionError("check() passed after the lock was lost")
            assert ran_past_expiry
            # The block was left promptly even though the release could not reach any broker.
        # The lease the dead broker kept alive runs out in etcd, and the entry goes with it.
        await eventually(lambda: _no_lock_keys(probe), 6, "the dead holder's entry to expire")
    finally:
        if proc.returncode is None:
            await stop_process(proc)


async def _no_lock_keys(probe: EtcdProbe) -> bool:
    return await probe.keys("/t/default/l/") == []

"""A load agent: a process of its own that runs jobs the orchestrator sends it (stdlib only).

Protocol, one JSON object per line. stdin: {"cmd": "job", "job": {...}}, {"cmd": "continue", ...}
(the answer to a barrier), {"cmd": "exit"}. stdout: {"event": "hello", "pid": ...},
{"event": "barrier", "name": ..., ...}, then {"event": "result", "data": {...}} or
{"event": "error", "message": ...}. Logs go to stderr.

Agents outlive a single run (a Python start and the grpc import cost ~0.5 s), but every job opens
and closes its own channel and sessions, so no state carries from one run to the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

from bench.workloads import WORKLOADS, Driver

DRIVERS: dict[str, tuple[str, str]] = {
    "broker": ("bench.drivers_grpc", "BrokerDriver"),
    "broker-stream": ("bench.drivers_grpc", "BrokerStreamDriver"),
    "broker-shared": ("bench.drivers_grpc", "SharedSessionDriver"),
    "broker-lease": ("bench.drivers_grpc", "LeasePerAcquireDriver"),
    "etcd-lock": ("bench.drivers_grpc", "EtcdLockDriver"),
    "etcd-txn": ("bench.drivers_grpc", "EtcdTxnDriver"),
    "echo": ("bench.drivers_grpc", "EchoDriver"),
    "aetcd": ("bench.drivers_aetcd", "AetcdDriver"),
    "broker-client": ("bench.drivers_prims", "BrokerClientDriver"),
    "etcd-rwmutex": ("bench.drivers_prims", "EtcdRWMutexDriver"),
    "etcd-semaphore": ("bench.drivers_prims", "EtcdSemaphoreDriver"),
}


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Inbox:
    """stdin lines, read by one thread for the whole life of the agent: a read abandoned by a
    cancelled job would otherwise swallow the next message."""

    queue: asyncio.Queue[str] | None = None

    @classmethod
    def start(cls) -> None:
        cls.queue = asyncio.Queue()
        threading.Thread(target=cls._read, args=(asyncio.get_running_loop(), cls.queue), daemon=True).start()

    @staticmethod
    def _read(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, "")


async def receive() -> dict[str, Any]:
    assert Inbox.queue is not None
    line = await Inbox.queue.get()
    if not line:
        raise EOFError("the orchestrator closed our stdin")
    message: dict[str, Any] = json.loads(line)
    return message


async def barrier(name: str, info: dict[str, Any]) -> dict[str, Any]:
    send({"event": "barrier", "name": name, "at": time.monotonic(), **info})
    answer = await receive()
    if answer.get("cmd") != "continue":
        raise RuntimeError(f"expected continue at barrier {name}, got {answer}")
    return answer


def make_driver(kind: str) -> Driver:
    module, cls = DRIVERS[kind]
    driver: Driver = getattr(importlib.import_module(module), cls)()
    return driver


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    driver = make_driver(job["driver"])
    await driver.open(job)
    cpu0 = os.times()
    try:
        async with asyncio.timeout(job["timeout"]):
            result = await WORKLOADS[job["workload"]](driver, job, barrier)
    finally:
        await driver.close()
    cpu1 = os.times()
    result["agent_cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return result


async def main() -> None:
    # Imported here (not per job) so the first run does not pay for it inside its window.
    for module in {m for m, _ in DRIVERS.values()}:
        with contextlib.suppress(ImportError):  # the aetcd interpreter has no lockbroker, ours no aetcd
            importlib.import_module(module)
    Inbox.start()
    send({"event": "hello", "pid": os.getpid(), "python": sys.version.split()[0]})
    for _ in range(1_000_000):
        message = await receive()
        if message.get("cmd") == "exit":
            return
        if message.get("cmd") != "job":
            send({"event": "error", "message": f"unexpected {message}"})
            continue
        try:
            send({"event": "result", "data": await run_job(message["job"])})
        except Exception as exc:
            send({"event": "error", "message": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})


if __name__ == "__main__":
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        asyncio.run(main())

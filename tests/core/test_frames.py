"""How deep the core's uncontended Acquire is: issue 13 caps our frames between the gRPC handler and
the etcd stub at 8, and the core's share is Acquirer.acquire -> the backend call: LockCore.acquire
hands back the acquirer's coroutine and is no frame of its own (nor one kept under every waiter).

Counted, not estimated: a backend double records the Python stack at each call (the frames of an
await chain are linked while it runs), from the call up to the test that awaits LockCore.acquire.
"""

from __future__ import annotations

import sys
from typing import Any

from lockbroker.server.core.locks import AcquireParams, LockCore
from lockbroker.server.core.memory import MemoryLockBackend


class Recording(MemoryLockBackend):
    def __init__(self) -> None:
        super().__init__()
        self.stacks: dict[str, list[str]] = {}

    def _record(self, method: str) -> None:
        names = [method]
        frame = sys._getframe(2)
        while frame is not None:
            names.append(frame.f_code.co_qualname)
            if frame.f_code.co_qualname.startswith("test_"):
                break
            frame = frame.f_back  # type: ignore[assignment]
        self.stacks[method] = names[::-1]

    async def grant_lease(self, ttl: int, lease_id: int = 0) -> Any:
        self._record("grant_lease")
        return await super().grant_lease(ttl, lease_id)

    async def enqueue(self, *args: Any, **kwargs: Any) -> Any:
        self._record("enqueue")
        return await super().enqueue(*args, **kwargs)


async def test_uncontended_acquire_is_one_frame_from_the_facade_to_the_backend() -> None:
    backend = Recording()
    core = LockCore(backend, "/frames")
    test = "test_uncontended_acquire_is_one_frame_from_the_facade_to_the_backend"
    g = await core.acquire("t", AcquireParams("a", None, 10, 0.0, "", "r-1"))
    assert g.fencing_token > 0
    assert backend.stacks["grant_lease"] == [test, "Acquirer.acquire", "grant_lease"]
    assert backend.stacks["enqueue"] == [test, "Acquirer.acquire", "enqueue"]
    s = await core.create_session("t", 10, "", "")
    await core.acquire("t", AcquireParams("b", int(s.session_id, 16), 10, 5.0, "", "r-2"))
    assert backend.stacks["enqueue"] == [test, "Acquirer.acquire", "enqueue"]
    await backend.close()

"""A waiter's wait is bounded in its own task (core/turn.py `_Wake`): its timer and the broker's
closing cancel the task, and the cancellation is turned back into TimeoutError or ShuttingDown,
unless something else (the client going away) asked to cancel it too: that cancellation wins."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from lockbroker.server.core.errors import ShuttingDown
from lockbroker.server.core.locks import LockCore
from lockbroker.server.core.memory import MemoryLockBackend
from lockbroker.server.core.model import Entry, EntryValue

PREFIX = b"/wake/locks/t/r#"
MINE = Entry(PREFIX + b"2", 2, 2, EntryValue("me", "r-2", 0.0))
AHEAD = PREFIX + b"1"


def _wait(core: LockCore, timeout: float) -> asyncio.Task[object]:
    acquirer = core._acquirer
    return asyncio.ensure_future(acquirer._until_deleted(PREFIX, (AHEAD, MINE.key), 0, timeout, MINE))


async def test_the_timer_ends_the_wait_with_timeout_and_leaves_nothing_behind() -> None:
    backend = MemoryLockBackend()
    core = LockCore(backend, "/wake")
    task = _wait(core, 0.01)
    with pytest.raises(TimeoutError):
        await task
    assert not core._acquirer._wakes
    assert not backend.watches


@pytest.mark.parametrize("timer_first", [True, False])
async def test_a_cancel_that_meets_the_timer_stays_a_cancel(timer_first: bool) -> None:
    backend = MemoryLockBackend()
    core = LockCore(backend, "/wake")
    task = _wait(core, 60.0)
    await asyncio.sleep(0)  # the wait is armed
    (wake,) = core._acquirer._wakes
    # The timer and the client's cancel in the same round of the loop, in either order.
    if timer_first:
        wake.expire()
        task.cancel()
    else:
        task.cancel()
        wake.expire()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert not core._acquirer._wakes
    assert not backend.watches


async def test_the_broker_closing_ends_every_wait_with_shutting_down() -> None:
    backend = MemoryLockBackend()
    core = LockCore(backend, "/wake")
    tasks = [_wait(core, 60.0) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(core._acquirer._wakes) == 3
    core.begin_shutdown()
    for task in tasks:
        with pytest.raises(ShuttingDown):
            await task
    assert not core._acquirer._wakes
    assert not backend.watches
    with pytest.raises(ShuttingDown):  # and a wait that starts after it is refused at once
        await _wait(core, 60.0)


async def test_a_cancel_swallowed_before_the_wait_does_not_turn_its_timer_into_a_cancel() -> None:
    """As asyncio.timeout counts them: a cancellation the task swallowed earlier (never
    uncancelled) is not taken for the client's when the wait's own timer fires."""
    backend = MemoryLockBackend()
    core = LockCore(backend, "/wake")
    acquirer = core._acquirer

    async def swallowed_then_wait() -> object:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, and not uncancelled
            await asyncio.sleep(1)
        return await acquirer._until_deleted(PREFIX, (AHEAD, MINE.key), 0, 0.01, MINE)

    with pytest.raises(TimeoutError):
        await asyncio.ensure_future(swallowed_then_wait())
    assert not acquirer._wakes
    assert not backend.watches

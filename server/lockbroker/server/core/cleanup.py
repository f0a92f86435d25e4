"""Clean-up that outlives its caller: removing what a failed call queued, even when cancelled or
while the backend is briefly away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from lockbroker.server.core.backend import ANSWER_MARGIN, BackendError, call_deadline
from lockbroker.server.core.errors import Unavailable

log = logging.getLogger("lockbroker.core")

# How long a caller waits for the clean-up of its abandoned call, and how long clean-up keeps
# retrying in the background while the backend is unreachable.
CLEANUP_TIMEOUT = 3.0
CLEANUP_WINDOW = 60.0
# The longest pause between two tries of a clean-up.
MAX_DELAY = 1.0
# Past CLEANUP_WINDOW, a clean-up whose session may still be alive goes on, this far apart, for
# at most CLEANUP_LIMIT in all (the largest session TTL the broker accepts by default, 1 h).
LATE_DELAY = 5.0
CLEANUP_LIMIT = 3600.0

# Whether the session the clean-up's keys live in is certainly gone (its lease ended: etcd
# deleted them). May raise Unavailable: then it is not known to be gone.
LeaseGone = Callable[[], Awaitable[bool]]


class Cleanups:
    """The clean-ups running in the background, so shutdown can give them time to finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[bool]] = set()

    async def run(self, work: Callable[[], Awaitable[object]], lease_gone: LeaseGone | None = None) -> bool:
        """Run clean-up to the end even if the caller is cancelled or the backend is briefly away.

        The caller waits at most CLEANUP_TIMEOUT; past that the clean-up goes on in the background,
        retrying for up to CLEANUP_WINDOW, so a waiter cut off by an etcd outage is still removed
        from the queue once etcd is back (else the next release would hand the lock to a caller
        that was told it did not get it). The session's lease remains the last resort.

        True if the clean-up finished while the caller waited; False if it goes on in the
        background (or gave up): then the caller must not claim that what it cleans up is gone.
        """
        deadline = call_deadline.get()
        task = self.start(work, lease_gone)
        # The caller's answer must not wait past its own deadline: the clean-up goes on without it.
        wait = CLEANUP_TIMEOUT
        if deadline is not None:
            wait = min(wait, deadline - ANSWER_MARGIN - time.monotonic())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=max(0.0, wait))
        return task.done() and not task.cancelled() and task.result()

    def start(self, work: Callable[[], Awaitable[object]], lease_gone: LeaseGone | None = None) -> asyncio.Task[bool]:
        """Run clean-up in the background, retrying as `run` says, without waiting for it.

        With `lease_gone` (the clean-up removes keys of one session), it goes on past
        CLEANUP_WINDOW, LATE_DELAY apart, until it succeeds or the session is known to be gone
        (at most CLEANUP_LIMIT): until then what it removes can still become a holder."""

        async def retrying() -> bool:
            started = time.monotonic()
            delay = 0.2
            while True:
                call_deadline.set(time.monotonic() + CLEANUP_TIMEOUT)
                try:
                    await work()
                    return True
                except (Unavailable, BackendError) as e:
                    # Any answer of the store, not only "unavailable": an error etcd has no
                    # status for during an election is no reason to leave an entry that becomes
                    # a holder nobody knows of.
                    if not isinstance(e, Unavailable):
                        log.info("clean-up failed (%s); retrying", e)
                    failure: Exception = e
                except Exception as e:
                    log.warning("clean-up failed; the session's lease will remove it: %s", e)
                    return False
                if time.monotonic() + delay >= started + CLEANUP_WINDOW:
                    if lease_gone is None or time.monotonic() >= started + CLEANUP_LIMIT:
                        log.warning("clean-up gave up; the session's lease will remove it: %s", failure)
                        return False
                    if await _known_gone(lease_gone):
                        return True  # etcd removed the session's keys with its lease
                    delay = LATE_DELAY
                await asyncio.sleep(delay)
                # At most MAX_DELAY apart in the window: once etcd is back (a partition healed)
                # the clean-up lands within a second, before anyone reads the queue expecting it gone.
                delay = min(delay * 2, MAX_DELAY) if delay < LATE_DELAY else LATE_DELAY

        task = asyncio.ensure_future(retrying())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Give pending clean-ups `timeout` to finish on shutdown; leases remove the rest."""
        if self._tasks:
            pending = list(self._tasks)
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()

    @property
    def pending(self) -> int:
        return len(self._tasks)


async def _known_gone(lease_gone: LeaseGone) -> bool:
    call_deadline.set(time.monotonic() + CLEANUP_TIMEOUT)
    try:
        return await lease_gone()
    except (Unavailable, BackendError):
        return False  # not known: the session may be alive

"""One long-lived thread per sink for its blocking calls (writes, fsyncs, probes, close).

`asyncio.to_thread` per batch cost, on the event loop, a context copy, a ThreadPoolExecutor
submit (its lock, a work item, a `concurrent.futures.Future` with a Condition of its own, the
pool's thread-count check) and the chaining of that future to an asyncio one: more than the
write's own Python work. Here a job is a deque entry and a notify, and its result comes back
with one `call_soon_threadsafe`, as to_thread's does.

Jobs run one at a time in the order they were handed over, so a sink's writes reach its file in
that order without waiting on each other. A job whose caller was cancelled still runs (as with
to_thread: a write is not abandoned half done); its result is dropped. The thread ends after
`IDLE` seconds without work, and when the sink closes. It is a daemon thread: an idle one must
not hold up the interpreter's exit for `IDLE` seconds. (to_thread's pool threads were joined
at exit; a process that exits without closing its audit log (the broker closes it as it stops)
may now end while a write is in flight, as it could end before the write was handed over.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class SinkWorker:
    """Runs a sink's blocking calls on its own thread, one at a time, in order."""

    IDLE = 10.0

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._running = False  # a thread serves the jobs (set and cleared under the lock)
        self._stopping = False  # the thread ends once the jobs are done, without waiting IDLE
        _WORKERS.add(self)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the worker's thread; its result or exception, once it ran."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        with self._cond:
            self._jobs.append((fn, done, loop))
            if self._running:
                self._cond.notify()
            else:
                self._running, self._stopping = True, False
                threading.Thread(target=self._serve, name=f"audit {self.name}", daemon=True).start()
        return await done

    def _serve(self) -> None:
        cond, jobs = self._cond, self._jobs
        while True:
            with cond:
                if not jobs:
                    if not self._stopping:
                        cond.wait(self.IDLE)
                    if not jobs:
                        self._running = False
                        return
                fn, done, loop = jobs.popleft()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, as to_thread would
                error = exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is left to tell
                loop.call_soon_threadsafe(_settle, done, result, error)
            del fn, done, result, error  # hold nothing of a finished job while idle

    def stop(self) -> None:
        """End the thread once the jobs handed over so far are done (a later job starts another)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def forget(self) -> None:
        """A forked child has no thread: start afresh (the parent's jobs are the parent's)."""
        self._jobs = deque()
        self._cond = threading.Condition(threading.Lock())
        self._running = self._stopping = False


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


_WORKERS: weakref.WeakSet[SinkWorker] = weakref.WeakSet()


def _forget_workers() -> None:
    for worker in list(_WORKERS):
        worker.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


__all__ = ["SinkWorker"]

"""One long-lived thread per sink for its blocking calls (writes, fsyncs, probes, close).

`asyncio.to_thread` per batch cost, on the event loop, a context copy, a ThreadPoolExecutor
submit (its lock, a work item, a `concurrent.futures.Future` with a Condition of its own, the
pool's thread-count check) and the chaining of that future to an asyncio one: more than the
write's own Python work. Here a job is one SimpleQueue put, and its result comes back with one
`call_soon_threadsafe`, as to_thread's does.

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
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class SinkWorker:
    """Runs a sink's blocking calls on its own thread, one at a time, in order."""

    IDLE = 10.0

    def __init__(self, name: str) -> None:
        self.name = name
        # A SimpleQueue's put and blocking get run in C: a Condition's notify and wait were
        # Python code on both threads, per batch.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: stop when idle
        self._lock = threading.Lock()
        self._running = False  # a thread serves the jobs (set and cleared under the lock)
        # When the job on the thread began (time.monotonic), None between jobs: written by the
        # thread, read by the loop's watchdog (busy_for). A float or None is one store.
        self._job_since: float | None = None
        _WORKERS.add(self)

    def busy_for(self, now: float) -> float:
        """How long the job on the thread has been running at `now` (time.monotonic), 0 if none
        is. A hung disk or pipe shows here; a busy event loop, or jobs waiting their turn, do not."""
        since = self._job_since
        return 0.0 if since is None else max(0.0, now - since)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on the worker's thread; its result or exception, once it ran."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        # Queued before the check: a thread that is ending looks at the queue under the lock
        # (see _serve), so either it takes this job or we start another thread.
        self._jobs.put((fn, done, loop))
        with self._lock:
            if not self._running:
                try:
                    threading.Thread(target=self._serve, name=f"audit {self.name}", daemon=True).start()
                except RuntimeError as exc:  # no thread to be had (resources): no job can run
                    self._fail_queued(exc)
                else:
                    # Running only once started: after a failed start the next job tries again,
                    # rather than every later job waiting on a thread that never came.
                    self._running = True
        return await done

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail every queued job with `exc` (none has run, none will: nothing is written late)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _fn, done, loop = job
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, done, None, exc)

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self.IDLE)
            except queue.Empty:
                job = None
            if job is None:  # idle, or asked to stop
                with self._lock:
                    if jobs.empty():
                        self._running = False
                        return
                continue
            fn, done, loop = job
            result: Any = None
            error: BaseException | None = None
            self._job_since = time.monotonic()
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, as to_thread would
                error = exc
            self._job_since = None
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is left to tell
                loop.call_soon_threadsafe(_settle, done, result, error)
            del job, fn, done, result, error  # hold nothing of a finished job while idle

    def stop(self) -> None:
        """End the thread once the jobs handed over so far are done (a later job starts another)."""
        self._jobs.put(None)

    def forget(self) -> None:
        """A forked child has no thread: start afresh (the parent's jobs are the parent's)."""
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._job_since = None  # a write in flight at the fork is the parent's


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

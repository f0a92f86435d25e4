"""The audit log's cheaper paths (issue 14) give what the general ones give.

The interceptor's records are rendered by `AuditLog._render_built` (the default processors applied
on one copy), the caller's metadata is read in one pass (`_caller`), a lost ResponseComplete record
is reported by the log itself (no callback on its future), and a sink's blocking calls run on one
long-lived thread (`SinkWorker`). Each is checked here against the path it replaces.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lockbroker.interceptors.audit import (
    DEFAULT_PROCESSORS,
    AuditLog,
    FileSink,
    Record,
    StreamSink,
    add_fields,
    render_json,
)
from lockbroker.interceptors.audit._pipeline import MAX_MESSAGE
from lockbroker.interceptors.audit._records import _caller
from lockbroker.interceptors.audit._worker import SinkWorker
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.base import metadata_value

SECRET = "lbk_abc_0123456789secret"


def _record(message: Any, secrets: list[str], **more: Any) -> Record:
    outcome = None if message is _NO_OUTCOME else {"code": "OK", "reason": None, "message": message}
    return {"schema": "s", "lock": "jobs/1", "outcome": outcome, **more, "_secrets": secrets}


_NO_OUTCOME = object()

CASES = [
    (_NO_OUTCOME, [SECRET]),
    (None, [SECRET]),
    ("", []),
    ("short and clean", [SECRET, "Bearer tok"]),
    (f"echoed {SECRET} twice {SECRET}", [SECRET]),
    (f"echoed {SECRET}", ["", "short", SECRET]),  # empty and short values are not secrets
    ("x" * (MAX_MESSAGE - 5) + SECRET, [SECRET]),  # cut after redaction
    ("y" * (MAX_MESSAGE + 1), []),
    ("y" * MAX_MESSAGE, []),
    ("line\u2028break\x85nel\x7fdel", []),  # escaped line breaks
    ("naïve ünïcode ✓", []),
]


@pytest.mark.parametrize(("message", "secrets"), CASES)
def test_a_built_record_renders_as_the_default_processors_render_it(message: Any, secrets: list[str]) -> None:
    log = AuditLog([MemorySink()])
    record = _record(message, secrets, stream={"received": 2, "sent": 1, "sessions": []})
    before = {**record}
    assert log._render_built(record) == log.render(record)
    assert record == before  # the caller's record is left as it was


@pytest.mark.parametrize(("message", "secrets"), CASES[:6])
def test_custom_processors_still_get_the_secrets(message: Any, secrets: list[str]) -> None:
    seen: list[Any] = []

    def peek(record: Record) -> Record:
        seen.append(record.get("_secrets"))
        return record

    log = AuditLog([MemorySink()], [peek, *DEFAULT_PROCESSORS, add_fields(cluster="eu-1")])
    line = log._render_built(_record(message, secrets))
    assert seen == [secrets]
    assert line == log.render(_record(message, secrets))
    assert b'"cluster":"eu-1"' in line


def test_render_json_escapes_the_same_breaks_without_a_search_for_ascii_lines() -> None:
    assert render_json({"a": "plain"}) == b'{"a":"plain"}\n'
    assert render_json({"a": "x\x7fy"}) == b'{"a":"x\\u007fy"}\n'
    assert render_json({"a": "\u2028\u2029\x85\x9f"}) == b'{"a":"\\u2028\\u2029\\u0085\\u009f"}\n'
    assert render_json({"a": "é\u2027"}) == '{"a":"é\u2027"}\n'.encode()  # not a break: raw


class _Metadata:
    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("user-agent", "grpc-python/1"),),
        (("x-api-key", "k1" * 8), ("user-agent", "ua"), ("authorization", "Bearer " + "t" * 10)),
        (("authorization", b"Bearer \xff" + b"t" * 10), ("x-api-key", b"k" * 9), ("user-agent", b"ua\xfe")),
        (("x-api-key", ""), ("x-api-key", "second" * 3), ("user-agent", "one"), ("user-agent", "two")),
        (("user-agent", "u" * 300),),
    ],
)
def test_the_caller_is_read_as_metadata_value_reads_it(metadata: tuple[tuple[str, str | bytes], ...]) -> None:
    context: Any = _Metadata(metadata)
    agent = metadata_value(context, "user-agent")
    expected_agent = (
        None if agent is None else agent[:256] + (f"…[truncated, {len(agent)} chars]" if len(agent) > 256 else "")
    )
    secrets = [v for key in ("x-api-key", "authorization") if (v := metadata_value(context, key))]
    assert _caller(context) == (expected_agent, secrets)


class _FailingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def write(self, lines: Any) -> None:
        await self.gate.wait()
        raise OSError(5, "Input/output error")


async def test_a_lost_lazy_record_is_reported_once_by_the_log(caplog: pytest.LogCaptureFixture) -> None:
    sink = _FailingSink()
    log = AuditLog([sink], write_timeout=5.0)
    lost: list[tuple[bytes | None, str]] = []
    line, done = log._submit({"n": 1}, log.render, True, lambda line, exc: lost.append((line, str(exc))))
    sink.gate.set()
    with pytest.raises(Exception, match="Input/output error"):
        await done
    assert lost == [(line, "audit sink memory failed: OSError(5, 'Input/output error')")]
    await log.close()


async def test_a_lazy_record_that_times_out_is_reported_once() -> None:
    sink = _FailingSink()  # never opens its gate: the write hangs
    log = AuditLog([sink], write_timeout=0.2)
    lost: list[str] = []
    _, done = log._submit({"n": 1}, log.render, True, lambda line, exc: lost.append(str(exc)))
    await asyncio.sleep(0.4)
    assert done.done() and lost == ["audit sinks did not finish within 0.2s"]
    sink.gate.set()  # the write fails now: the record was reported already
    await log.close()
    assert lost == ["audit sinks did not finish within 0.2s"]


async def test_an_unrenderable_lazy_record_is_reported_at_once() -> None:
    def broken(record: Record) -> Record:
        raise ValueError("no")

    log = AuditLog([MemorySink()], [broken])
    lost: list[tuple[bytes | None, str]] = []
    line, done = log._submit({"n": 1}, log.render, True, lambda line, exc: lost.append((line, str(exc))))
    assert line is None and done.done() and lost == [(None, "audit processors failed: ValueError('no')")]
    await log.close()


async def test_close_writes_what_is_queued_while_it_closes(tmp_path: Path) -> None:
    sink = MemorySink()
    log = AuditLog([sink])
    first = log.submit({"n": 1})[1]
    closing = asyncio.ensure_future(log.close())
    await asyncio.sleep(0)
    second = log.submit({"n": 2})[1]
    await closing
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert [r["n"] for r in sink.records()] == [1, 2]
    await log.close()


async def test_a_file_sinks_calls_run_in_order_on_one_thread(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "a.jsonl", fsync="never")
    threads: set[int] = set()
    real = sink._write_sync

    def tracked(data: bytes) -> None:
        threads.add(threading.get_ident())
        if b'"n":0' in data:
            time.sleep(0.05)  # a slow first write: the others wait their turn, they do not overtake it
        real(data)

    sink._write_sync = tracked  # type: ignore[method-assign]
    await asyncio.gather(*(sink.write([f'{{"n":{i}}}\n'.encode()]) for i in range(20)))
    await sink.close()
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert (tmp_path / "a.jsonl").read_text().splitlines() == [f'{{"n":{i}}}' for i in range(20)]


async def test_a_worker_hands_back_errors_and_runs_a_cancelled_callers_job() -> None:
    worker = SinkWorker("test")
    ran = threading.Event()

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await worker.run(fail)

    def slow() -> int:
        time.sleep(0.1)
        ran.set()
        return 1

    job = asyncio.ensure_future(worker.run(slow))
    await asyncio.sleep(0.02)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert await worker.run(lambda: 2) == 2 and ran.is_set()
    worker.stop()
    for _ in range(500):  # a loaded machine may take a while to run the thread
        if not any(t.name == "audit test" for t in threading.enumerate()):
            break
        await asyncio.sleep(0.01)
    assert not any(t.name == "audit test" for t in threading.enumerate())
    assert await worker.run(lambda: 3) == 3  # a job after stop starts a thread again
    worker.stop()


def test_logging_of_a_lost_record_names_it(caplog: pytest.LogCaptureFixture) -> None:
    from lockbroker.interceptors.audit._interceptor import _lost_lazily  # noqa: PLC0415 - this test only

    with caplog.at_level(logging.ERROR, "lockbroker.audit"):
        _lost_lazily({"auditId": "id-1"}, "the caller was answered", b'{"n":1}\n', OSError("disk"))
        _lost_lazily({"auditId": "id-2"}, "cancelled", None, OSError("disk"))
    assert '{"n":1}' in caplog.text and "the caller was answered" in caplog.text
    assert "(unprocessable record id-2)" in caplog.text


async def test_ready_now_is_true_only_when_ready_surely_is(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "r.jsonl")
    log = AuditLog([sink])
    assert not log.ready_now()  # not opened yet: ready() probes the file system
    assert await log.ready()
    assert log.ready_now()
    sink._failed_at = time.monotonic()  # a write failed
    assert not log.ready_now() and not await log.ready()
    sink._failed_at = None
    assert not AuditLog([sink, MemorySink()]).ready_now()  # a sink without the check: ask ready()
    stream = io.BytesIO()
    assert AuditLog([StreamSink(stream)]).ready_now()
    stream.close()
    assert not AuditLog([StreamSink(stream)]).ready_now()

    class Broken(StreamSink):
        def _ready_now(self) -> bool:
            raise ValueError("no")

    assert not AuditLog([Broken(io.BytesIO())]).ready_now()
    await log.close()


@pytest.mark.parametrize("fails", ["write", "datasync"])
def test_a_failed_write_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    """The file's size is read after a failure, not before every write: what the failed write
    appended (part of a batch, or all of it when the sync failed) is cut, the rest stays."""
    from lockbroker.interceptors.audit import _sinks  # noqa: PLC0415 - this test only

    path = tmp_path / "t.jsonl"
    sink = FileSink(path, fsync="always")
    sink._write_sync(b'{"n":1}\n')
    fd = sink._fd
    real_write = os.write
    calls = 0

    def torn(target: int, data: Any) -> int:
        nonlocal calls
        if target != fd:
            return real_write(target, data)
        calls += 1
        if calls == 1:
            return real_write(target, bytes(data[:5]))  # a short write, then the disk fills up
        raise OSError(28, "No space left on device")

    def no_sync(target: int) -> None:
        raise OSError(5, "Input/output error")

    if fails == "write":
        monkeypatch.setattr(os, "write", torn)  # the sink calls os.write; other fds pass through
    else:
        monkeypatch.setattr(_sinks, "_datasync", no_sync)
    with pytest.raises(OSError):
        sink._write_sync(b'{"n":2}\n{"n":3}\n')
    monkeypatch.undo()
    assert path.read_bytes() == b'{"n":1}\n'
    sink._write_sync(b'{"n":4}\n')
    assert path.read_bytes() == b'{"n":1}\n{"n":4}\n'
    sink._close_sync()


def test_a_failed_sync_never_cuts_another_workers_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --workers N` append to one file: when a sync fails after another worker appended
    behind our lines, ours stay (torn or not) rather than the cut taking its records."""
    from lockbroker.interceptors.audit import _sinks  # noqa: PLC0415 - this test only

    path = tmp_path / "shared.jsonl"
    sink = FileSink(path, fsync="always")
    sink._write_sync(b'{"n":1}\n')
    other = os.open(path, os.O_WRONLY | os.O_APPEND)

    def another_worker_then_fail(_fd: int) -> None:
        os.write(other, b'{"worker":2}\n')  # answered by that worker: it must stay
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(_sinks, "_datasync", another_worker_then_fail)
    with pytest.raises(OSError):
        sink._write_sync(b'{"n":2}\n')
    monkeypatch.undo()
    os.close(other)
    assert path.read_bytes() == b'{"n":1}\n{"n":2}\n{"worker":2}\n'
    sink._close_sync()


async def test_a_worker_whose_thread_cannot_start_fails_the_job_and_starts_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = SinkWorker("starved")
    real_start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    ran: list[int] = []
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await worker.run(lambda: ran.append(1))
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert await worker.run(lambda: 7) == 7  # a thread now: the worker is not stuck
    assert ran == []  # the failed job never runs late
    worker.stop()

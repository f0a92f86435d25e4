"""Group commit of the audit log, and the RequestReceived record's fsync overlapping the handler.

The sink doubles here count writes: the file sink does one write and one fdatasync per batch
(`FileSink._write_sync`), so a write to a double stands for one fsync. Nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from grpc import aio

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog, AuditWriteError, FileSink, _sinks
from lockbroker.interceptors.audit.testing import MemorySink
from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.v1 import lock_pb2
from tests.interceptors.test_audit import api_key, chain, serving, stub, until

__all__ = ["api_key"]  # the fixture, shared with test_audit

CONCURRENCY = 64


class FsyncCounter(MemorySink):
    """A sink whose every write stands for one fsync; `allow(n)` lets n more writes finish (None:
    all), as a disk that is slow exactly when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: int | None = None
        self._poke = asyncio.Event()
        self.batches: list[int] = []
        self.in_flight = 0

    def allow(self, n: int | None) -> None:
        self.allowed = n
        self._poke.set()

    async def write(self, lines: Sequence[bytes]) -> None:
        self.in_flight += 1
        try:
            while self.allowed is not None and self.allowed <= 0:
                self._poke.clear()
                await self._poke.wait()
            if self.allowed is not None:
                self.allowed -= 1
            await asyncio.sleep(0)  # a real fsync yields the loop to other calls, too
            self.batches.append(len(lines))
            self.lines.extend(lines)
        finally:
            self.in_flight -= 1


async def _acquire_many(port: int, key: str, n: int) -> list[int]:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        s = stub(ch)

        async def one(i: int) -> int:
            req = lock_pb2.AcquireRequest(name=f"l/{i}", session_id="s-1", owner="ok", request_id=f"r-{i}")
            resp = await s.Acquire(req, metadata=(("x-api-key", key),), timeout=30)
            return resp.grant.fencing_token

        return list(await asyncio.gather(*(one(i) for i in range(n))))


@pytest.mark.parametrize("staged", [False, True], ids=["single", "staged"])
async def test_concurrent_calls_share_fsyncs(api_key: tuple[str, IdentityInterceptor], staged: bool) -> None:
    """64 concurrent Acquires: every record written, far fewer fsyncs than records.

    The first fsync is held until every call has reached the audit log (each call's record is
    then queued behind it), as a slow disk would; the rest go as fast as the double allows.
    """
    key, identity = api_key
    sink = FsyncCounter()
    sink.allow(0)
    log = AuditLog([sink])
    async with serving(chain(AuditInterceptor(log), identity, staged)) as srv:
        calls = asyncio.ensure_future(_acquire_many(srv.port, key, CONCURRENCY))
        await until(lambda: srv.servicer.calls.get("Acquire", 0) == CONCURRENCY and sink.in_flight == 1)
        if staged:
            # The handlers ran while the first RequestReceived record's write was held: the fsync
            # and the handler's work overlap, and no call was answered before its record was durable.
            assert not calls.done()
        sink.allow(None)
        tokens = await calls
        await until(lambda: len(sink.lines) == CONCURRENCY * (2 if staged else 1))
    await log.close()
    assert tokens == [42] * CONCURRENCY
    records = sink.records()
    assert len(records) == CONCURRENCY * (2 if staged else 1)
    fsyncs = len(sink.batches)
    per_fsync = len(records) / fsyncs
    mode = "staged" if staged else "single"
    print(f"\n{mode}: {len(records)} records in {fsyncs} fsyncs ({per_fsync:.1f} per fsync)")
    # Without group commit this is one fsync per record (64 or 128).
    assert fsyncs <= 8, sink.batches


async def test_records_per_fsync_of_the_file_sink(
    api_key: tuple[str, IdentityInterceptor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real file sink under 64 concurrent calls: fdatasync counted, records per fsync reported."""
    key, identity = api_key
    syncs: list[int] = []
    real = _sinks._datasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(_sinks, "_datasync", counted)
    path = tmp_path / "audit.jsonl"
    log = AuditLog([FileSink(path, fsync="always")])
    async with serving(chain(AuditInterceptor(log), identity, True)) as srv:
        await _acquire_many(srv.port, key, CONCURRENCY)
        await until(lambda: len(path.read_bytes().splitlines()) == 2 * CONCURRENCY)
    await log.close()
    records = 2 * CONCURRENCY
    fsyncs = len(syncs) - 1  # close() syncs once more
    print(f"\nfile sink: {records} records in {fsyncs} fsyncs ({records / fsyncs:.1f} per fsync)")
    assert 1 <= fsyncs < records  # at least two records shared an fsync; the ratio is printed


async def test_the_answer_waits_for_the_request_record_not_the_completion_record(
    api_key: tuple[str, IdentityInterceptor],
) -> None:
    """One call, staged: answered once its RequestReceived record is written, while its
    ResponseComplete record's write is still held."""
    key, identity = api_key
    sink = FsyncCounter()
    log = AuditLog([sink])
    async with serving(chain(AuditInterceptor(log), identity, True)) as srv:
        sink.allow(0)
        call = asyncio.ensure_future(_acquire_many(srv.port, key, 1))
        await until(lambda: srv.servicer.calls.get("Acquire", 0) == 1 and sink.in_flight == 1)
        assert not call.done()  # the request record is not durable yet: no answer
        assert sink.lines == []
        # Let exactly the request record's write through; the completion record's is held.
        sink.allow(1)
        assert await call == [42]
        assert [r["stage"] for r in sink.records()] == ["RequestReceived"]
        await until(lambda: sink.in_flight == 1)  # the completion record, queued before the answer
        sink.allow(None)
        await until(lambda: len(sink.lines) == 2)
    await log.close()
    received, completed = sink.records()
    assert completed["stage"] == "ResponseComplete"
    assert completed["requestAuditId"] == received["auditId"]
    assert (completed["fencingToken"], completed["outcome"]["code"]) == ("42", "OK")


async def test_completion_records_do_not_take_an_fsync_of_their_own(
    api_key: tuple[str, IdentityInterceptor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential calls, staged, on the real file sink: each call's ResponseComplete record is
    held (`write_lazily`) and written with the next call's RequestReceived record, under its
    fsync, the only one that call waits for; the last one goes with the timed write."""
    key, identity = api_key
    syncs: list[int] = []
    real = _sinks._datasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(_sinks, "_datasync", counted)
    monkeypatch.setattr(FileSink, "LAZY_SYNC_DELAY", 30.0)  # no timed sync inside the calls
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path, fsync="always")
    log = AuditLog([sink])
    calls = 5
    async with serving(chain(AuditInterceptor(log), identity, True)) as srv:
        for _ in range(calls):
            await _acquire_many(srv.port, key, 1)
        await until(lambda: len(sink._held) == 1)
        # One write and fsync per RequestReceived record (each call waits for its own), carrying
        # the previous call's completion record; none of their own for completions.
        assert len(syncs) == calls
        assert len(path.read_bytes().splitlines()) == 2 * calls - 1
        # The last completion record waits for the timed write.
        assert sink._lazy_sync is not None
        sink._lazy_sync.cancel()
        sink._sync_lazily()
        await until(lambda: len(path.read_bytes().splitlines()) == 2 * calls)
        assert len(syncs) == calls + 1 and not sink._held
        stages = [line.split(b'"stage":"')[1].split(b'"')[0] for line in path.read_bytes().splitlines()]
        assert stages == [b"RequestReceived", b"ResponseComplete"] * calls
    await log.close()


async def test_a_batch_with_a_waited_for_record_is_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lazy records queued with a record someone waits for share its (synced) write."""
    syncs: list[int] = []
    monkeypatch.setattr(_sinks, "_datasync", syncs.append)
    sink = FileSink(tmp_path / "a.jsonl", fsync="always")
    log = AuditLog([sink])
    _, lazy1 = log.submit({"n": 1}, lazy=True)
    _, waited = log.submit({"n": 2})
    _, lazy2 = log.submit({"n": 3}, lazy=True)
    await asyncio.gather(lazy1, waited, lazy2)
    assert len(syncs) == 1 and not sink._dirty
    _, lazy3 = log.submit({"n": 4}, lazy=True)
    await lazy3
    assert len(syncs) == 1 and sink._held  # held for the next write
    await log.close()  # close writes and syncs what is held (and syncs once more, as always)
    assert len(syncs) == 3 and not sink._held
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2, 3, 4]


async def test_held_records_that_cannot_be_written_are_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A held completion record whose write fails goes to the process log, as any record nobody waits for."""
    sink = FileSink(tmp_path / "b.jsonl", fsync="always")
    log = AuditLog([sink])
    _, lazy = log.submit({"n": "held-one"}, lazy=True)
    await lazy

    def broken(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink, "_write_sync", broken)
    _, waited = log.submit({"n": "waited"})
    with pytest.raises(AuditWriteError):
        await waited
    assert "held-one" in caplog.text and not sink._held
    monkeypatch.undo()
    await log.close()


async def test_a_timed_write_of_held_records_keeps_their_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A synced write that comes while the timed write of held records is on its way waits for it:
    the file keeps the order in which records were handed over, as every other sink does."""
    path = tmp_path / "c.jsonl"
    sink = FileSink(path, fsync="always")
    real = sink._write_sync

    def slow_first(data: bytes) -> None:
        if b"held" in data:
            time.sleep(0.3)  # the timed write is slow to get the file's lock
        real(data)

    monkeypatch.setattr(sink, "_write_sync", slow_first)
    await sink.write_lazily([b'{"n":"held"}\n'])
    assert sink._lazy_sync is not None
    sink._lazy_sync.cancel()
    sink._sync_lazily()  # the timer fires
    await asyncio.sleep(0.05)  # the timed write is in its thread
    await sink.write([b'{"n":"next"}\n'])
    await sink.close()
    assert [json.loads(line)["n"] for line in path.read_bytes().splitlines()] == ["held", "next"]


def test_a_rendered_line_holds_only_its_own_bytes() -> None:
    """Every blocked Acquire holds its RequestReceived line until it is answered: a line must not
    carry orjson's 4 KB write buffer with it (it did: 4,098 bytes allocated for a 526-byte line,
    ~8 KB per waiting call)."""
    import tracemalloc  # noqa: PLC0415 - this test only

    from lockbroker.interceptors.audit._pipeline import render_json  # noqa: PLC0415

    record = {"schema": "lockbroker.audit/v1", "lock": "orders/42", "outcome": {"code": "OK"}, "pad": "x" * 400}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        lines = [render_json(record) for _ in range(200)]
        per_line = (tracemalloc.get_traced_memory()[0] - before) / len(lines)
    finally:
        tracemalloc.stop()
    assert lines[0].endswith(b"\n") and json.loads(lines[0]) == record
    assert per_line < 2 * len(lines[0]), f"{per_line:.0f} bytes allocated per {len(lines[0])}-byte line"

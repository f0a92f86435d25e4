"""What an enqueue Txn costs etcd as one lock's queue grows, on a real (embedded) etcd.

    uv run python -m bench.micro_queue [--depths 0,100,1000,4000] [--txns 40]

The broker's enqueue Txn (server/lockbroker/server/etcd/backend.py, `enqueue`) puts the waiter's
key and reads, in the same Txn, the queue's head (first by create revision) and its tail (the
last two by create revision): etcd's Lock service and its `concurrency` Mutex read the same way
(first-create, last-create before mine). etcd applies a range with a sort order or a revision
filter by reading every key of the range with its value and sorting them; a `limit` only cuts
the answer. So each enqueue reads the whole queue, and N waiters on one lock cost etcd O(N^2)
reads in all. This measures that per Txn, beside the same Txn with unsorted (key order) reads,
which etcd stops after `limit` keys: the difference is the sort's price at each depth.

Prints the median Txn latency (ms) per depth. etcd is our child process, on free loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from grpc import aio

from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.etcd import rpc_pb2 as pb
from lockbroker.server.etcd import rpc_pb2_grpc as pb_grpc

VALUE = b"x" * 160  # about an entry value's size (owner, request id, times, claim)


def _end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _txn(prefix: bytes, key: bytes, *, sorted_reads: bool) -> pb.TxnRequest:
    by_create, asc, desc = pb.RangeRequest.CREATE, pb.RangeRequest.ASCEND, pb.RangeRequest.DESCEND
    if sorted_reads:  # as enqueue reads: the head and the last two, by create revision
        head = pb.RangeRequest(key=prefix, range_end=_end(prefix), limit=1, sort_target=by_create, sort_order=asc)
        tail = pb.RangeRequest(key=prefix, range_end=_end(prefix), limit=2, sort_target=by_create, sort_order=desc)
    else:  # the same limits in key order: etcd reads no more than `limit` keys
        head = pb.RangeRequest(key=prefix, range_end=_end(prefix), limit=1)
        tail = pb.RangeRequest(key=prefix, range_end=_end(prefix), limit=2)
    return pb.TxnRequest(
        success=[
            pb.RequestOp(request_put=pb.PutRequest(key=key, value=VALUE)),
            pb.RequestOp(request_range=head),
            pb.RequestOp(request_range=tail),
        ]
    )


async def _fill(kv: pb_grpc.KVAsyncStub, prefix: bytes, start: int, stop: int) -> None:
    sem = asyncio.Semaphore(64)

    async def put(i: int) -> None:
        async with sem:
            await kv.Put(pb.PutRequest(key=prefix + b"%08d" % i, value=VALUE), timeout=30)

    await asyncio.gather(*(put(i) for i in range(start, stop)))


async def _rows(kv: pb_grpc.KVAsyncStub, depths: list[int], txns: int) -> None:
    prefix = b"/microq/lock/"
    filled = 0
    print("queue depth | enqueue Txn, sorted reads (as etcd's Lock) | same, unsorted reads | ms")
    for depth in depths:
        await _fill(kv, prefix, filled, depth)
        filled = depth
        row = []
        for sorted_reads in (True, False):
            times = []
            for n in range(txns):
                key = b"%s~%d-%d-%d" % (prefix, depth, sorted_reads, n)
                t0 = time.perf_counter()
                await kv.Txn(_txn(prefix, key, sorted_reads=sorted_reads), timeout=30)
                times.append((time.perf_counter() - t0) * 1000)
                # Take it out again: the depth stays what the row says.
                await kv.DeleteRange(pb.DeleteRangeRequest(key=key), timeout=30)
            row.append(statistics.median(times))
        print(f"{depth:>11,} | {row[0]:.2f} | {row[1]:.2f}")


async def main(args: argparse.Namespace) -> None:
    depths = sorted({int(d) for d in args.depths.split(",")})
    with tempfile.TemporaryDirectory(prefix="lockbroker-microq-") as d:
        async with (
            EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=Path(d) / "etcd")) as etcd,
            aio.insecure_channel(etcd.endpoint.removeprefix("http://")) as ch,
        ):
            await _rows(pb_grpc.KVStub(ch), depths, args.txns)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="0,100,1000,4000", help="queue depths to measure at, comma-separated")
    parser.add_argument("--txns", type=int, default=40, help="Txns timed per depth and kind (bounded)")
    asyncio.run(main(parser.parse_args()))

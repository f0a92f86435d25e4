"""A client process that takes one lock and keeps writing to the fenced resource with its token.

    python -m tests.fault.worker --id p0 --target 127.0.0.1:5001 --target 127.0.0.1:5002 \\
        --history h.jsonl --resource r.json --lock jobs/x --ttl 3

It prints `HELD <token> <session>` once it holds the lock, so a test can pause (SIGSTOP) or kill it
there. It is a naive holder on purpose: it writes with its token without checking its own expiry,
so that only the resource's fencing check stands between a paused holder and a stale write. Once
it notices that its session has lapsed it tries to refresh that session and to release its token
(both must fail to revive or release anything), prints `DONE`, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from lockbroker.client import LockBrokerError
from tests.fault.clients import FencedResource, LockClient
from tests.fault.history import History


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--id", required=True)
    ap.add_argument("--target", action="append", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--resource", required=True)
    ap.add_argument("--lock", required=True)
    ap.add_argument("--ttl", type=int, default=3)
    ap.add_argument("--wait", type=float, default=10.0)
    ap.add_argument("--hold", type=float, default=60.0, help="give up holding after this many seconds")
    args = ap.parse_args(argv)

    history = History(Path(args.history))
    lc = LockClient(args.id, history, args.target, ttl=args.ttl, resource=FencedResource(Path(args.resource)))
    try:
        session = await lc.open_session()
        token = await lc.acquire(args.lock, args.wait)
        if token is None:
            print("NOT_ACQUIRED", flush=True)
            return 1
        print(f"HELD {token} {session}", flush=True)
        until = time.monotonic() + args.hold
        while time.monotonic() < until:
            lc.write(args.lock, token)  # naive: no look at its own expiry first
            if not lc.alive:
                break
            await asyncio.sleep(0.2)
        print("LOST", flush=True)
        await lc.refresh_once(session)
        await lc.release(args.lock, token)
        print("DONE", flush=True)
        return 0
    except LockBrokerError as e:
        print(f"ERROR {e}", flush=True)
        return 2
    finally:
        await lc.close()
        history.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))

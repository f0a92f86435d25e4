"""Which asyncio event loop a broker process runs on (`--event-loop`).

uvloop runs the same asyncio code with less CPU per callback; grpc.aio drives any asyncio loop
through its own poller thread, so nothing else changes. It is optional and off by default: in a
process that is both broker and load generator it saved ~10% of CPU per lock cycle
(bench/micro_stream.py), but a broker alone measured the same on either loop in the full
benchmark (bench/README.md, "Event loop"). The flag lets an operator measure it on their own load.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lockbroker.server.config import ConfigError

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def resolve(choice: str) -> str:
    """The loop `choice` names: "auto" is uvloop when it is importable, else asyncio."""
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(
            "--event-loop / LOCKBROKER_EVENT_LOOP / [server] event_loop: uvloop is not installed "
            "(pip install 'lockbroker[uvloop]'), or choose asyncio"
        )
    return choice


def factory(choice: str) -> LoopFactory | None:
    """A loop factory for asyncio.Runner; None for asyncio's default loop."""
    if resolve(choice) == "asyncio":
        return None
    import uvloop  # noqa: PLC0415 (optional: imported only when chosen)

    return uvloop.new_event_loop


def run(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """asyncio.run(main()) on the chosen loop (chosen first: a refusal leaves no coroutine unawaited)."""
    loop_factory = factory(choice)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def name(loop: asyncio.AbstractEventLoop) -> str:
    """What the running loop is, for the startup log: "uvloop" or "asyncio"."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

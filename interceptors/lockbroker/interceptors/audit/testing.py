"""A sink for tests: records in memory, with readiness and write failures the test controls.

Shipped with the package (as structlog ships `structlog.testing`) so users' tests of their own
processors and audit setups need not write one:

    sink = MemorySink()
    interceptor = AuditInterceptor(AuditLog([sink]))
    ...
    assert sink.records()[0]["outcome"]["code"] == "OK"
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


class MemorySink:
    """Keeps every line written; `ready=False` fails the readiness probe, `fail=True` every write."""

    def __init__(self, *, ready: bool = True, fail: bool = False, name: str = "memory") -> None:
        self.name = name
        self.lines: list[bytes] = []
        self.is_ready = ready
        self.fail = fail

    async def write(self, lines: Sequence[bytes]) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.lines.extend(lines)

    async def ready(self) -> bool:
        return self.is_ready

    async def close(self) -> None:
        pass

    def records(self) -> list[dict[str, Any]]:
        """The records written so far, parsed."""
        return [json.loads(line) for line in self.lines]


__all__ = ["MemorySink"]

"""`Chain`: wrapping interceptors folded into one, on a real grpc.aio server over 127.0.0.1.

The chain must behave exactly as the same interceptors given to grpc one by one (order, context
variables, unknown methods), while building each method's wrapped handler only once.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.interceptors.base import (
    CallInfo,
    Chain,
    Context,
    Handler,
    UnaryBehavior,
    WrappingInterceptor,
    chain,
)

SERVICE = "test.Echo"
trail: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("trail", default=())


class Mark(WrappingInterceptor):
    """Appends its name to a context variable the handler answers with; counts its wraps."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wraps = 0

    def wrap_unary(self, behavior: UnaryBehavior, call: CallInfo) -> UnaryBehavior:
        self.wraps += 1

        async def marked(request: Any, context: Context) -> Any:
            trail.set((*trail.get(), self.name))
            return await behavior(request, context)

        return marked


class Missing(Mark):
    """Answers methods nobody serves, as the audit interceptor does (to record them)."""

    def handle_missing(self, method: str) -> Handler | None:
        async def missing(request: bytes, context: Context) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} saw {method}")
            raise AssertionError("unreachable")

        return grpc.unary_unary_rpc_method_handler(missing)


class NotWrapping(aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        return await continuation(details)


async def echo(request: bytes, context: Context) -> bytes:
    return ",".join(trail.get()).encode()


async def call(channel: aio.Channel, method: str) -> bytes:
    multi: Any = channel.unary_unary(f"/{SERVICE}/{method}")
    answer: bytes = await multi(b"", timeout=5)
    return answer


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[aio.Channel, list[Mark]]]:
    marks: list[Mark] = [Missing("outer"), Mark("middle"), Mark("inner")]
    interceptors: list[aio.ServerInterceptor] = chain(marks) if request.param == "chain" else list(marks)
    server = aio.server(interceptors=interceptors)
    handler: Handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, marks
    finally:
        await server.stop(0)


@pytest.mark.parametrize("served", ["chain", "one-by-one"], indirect=True)
async def test_order_and_unknown_methods_are_the_same_either_way(served: tuple[aio.Channel, list[Mark]]) -> None:
    channel, _ = served
    assert await call(channel, "Echo") == b"outer,middle,inner"
    with pytest.raises(aio.AioRpcError) as missing:
        await call(channel, "Nope")
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert missing.value.details() == f"outer saw /{SERVICE}/Nope"


@pytest.mark.parametrize("served", ["chain"], indirect=True)
async def test_a_method_is_wrapped_once_for_all_its_calls(served: tuple[aio.Channel, list[Mark]]) -> None:
    channel, marks = served
    for _ in range(20):
        assert await call(channel, "Echo") == b"outer,middle,inner"
    assert [m.wraps for m in marks] == [1, 1, 1]


def test_only_runs_of_wrapping_interceptors_are_folded() -> None:
    a, b, c = Mark("a"), Mark("b"), Mark("c")
    plain = NotWrapping()
    folded = chain([plain, a, b, plain, c])
    assert [type(i) for i in folded] == [NotWrapping, Chain, NotWrapping, Chain]
    assert isinstance(folded[1], Chain) and folded[1].interceptors == (a, b)
    assert isinstance(folded[3], Chain) and folded[3].interceptors == (c,)

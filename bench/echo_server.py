"""The ceiling: a trivial grpc.aio server whose two unary methods return the request bytes.

No protobuf and no interceptors: what one Python gRPC process costs per call, nothing more.
Prints {"port": N} on stdout once serving; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import grpc
from grpc import aio


async def _echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(listen: str) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        name: grpc.unary_unary_rpc_method_handler(_echo)  # no (de)serializers: bytes in, bytes out
        for name in ("Acquire", "Release")
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"port": port}), flush=True)
    await stop.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0"))

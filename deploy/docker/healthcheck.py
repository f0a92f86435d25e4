"""Docker HEALTHCHECK: exit 0 if the broker's gRPC health says SERVING, else 1.

Plaintext to 127.0.0.1 by default; LOCKBROKER_HEALTHCHECK_TARGET (host:port) and
LOCKBROKER_HEALTHCHECK_SERVICE (default: the broker's own service, which follows etcd) change it.
A TLS-only listener needs the broker's plaintext health port (see docs/operating.md).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    listen = os.environ.get("LOCKBROKER_LISTEN", "0.0.0.0:50051")
    port = listen.rsplit(":", 1)[-1]
    target = os.environ.get("LOCKBROKER_HEALTHCHECK_TARGET") or f"127.0.0.1:{port}"
    service = os.environ.get("LOCKBROKER_HEALTHCHECK_SERVICE", "lockbroker.v1.LockService")
    try:
        with grpc.insecure_channel(target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
    except grpc.RpcError as e:
        print(f"health check of {target} failed: {e.code().name}", file=sys.stderr)
        return 1
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{service or 'server'} at {target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

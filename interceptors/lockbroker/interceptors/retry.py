"""The retry policy for gRPC clients in other languages: `SERVICE_CONFIG`.

`python -m lockbroker.interceptors.retry` prints docs/service-config.json. Python clients use the
client package's own retry (`lockbroker.client._retry.call_with_retry`); the broker's retry of
transient etcd failures lives in the service edge (`lockbroker.server.service.rpc`), the one layer
that knows which calls are idempotent. Not an interceptor: it stays here only until the service
config is derived from the proto's idempotency levels with the client's retry.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any, Final

LOCK_SERVICE: Final = "lockbroker.v1.LockService"


# --- service config for other languages -----------------------------------------------------------

SERVICE_CONFIG: Final[Mapping[str, Any]] = {
    "methodConfig": [
        {
            # Every LockService method. Acquire, Release and CreateSession are safe to repeat only
            # with a request_id: clients using this policy must always set one.
            "name": [{"service": LOCK_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Stops a client from multiplying load on a broker whose etcd is down: once more than half
    # the tokens are spent by failures, retries pause until successes earn them back.
    "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
}

SERVICE_CONFIG_JSON: Final = json.dumps(SERVICE_CONFIG, indent=2) + "\n"
"""For `grpc.service_config` channel options; identical to docs/service-config.json."""


def main() -> None:
    sys.stdout.write(SERVICE_CONFIG_JSON)


if __name__ == "__main__":
    main()


__all__ = ["SERVICE_CONFIG", "SERVICE_CONFIG_JSON"]

"""Which etcd failures the broker treats as "unavailable, retry" (EtcdClient._translate).

An error the translation does not know reaches the caller as INTERNAL (a bug, with an incident
id), so every way etcd or grpc says "not now" must be on the transient side. The fault suite saw
INTERNAL once while leadership moved between members.
"""

from __future__ import annotations

import grpc
import pytest
from grpc import aio

from lockbroker.server.config import EtcdConfig
from lockbroker.server.core.backend import BackendError
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.etcd.client import EtcdClient


def translate(code: grpc.StatusCode, details: str, *, write: bool) -> Exception:
    client = EtcdClient(EtcdConfig(endpoints=("http://127.0.0.1:1", "http://127.0.0.1:2")))
    return client._translate(aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details), 0, write)


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNKNOWN, "raft proposal dropped"),
        (grpc.StatusCode.UNKNOWN, "raft: stopped"),
        (grpc.StatusCode.UNKNOWN, "Stream removed"),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
        (grpc.StatusCode.UNKNOWN, "context deadline exceeded"),
    ],
)
def test_etcd_saying_not_now_is_unavailable_with_an_unknown_write_outcome(code: grpc.StatusCode, details: str) -> None:
    err = translate(code, details, write=True)
    assert isinstance(err, Unavailable), err
    assert err.outcome_unknown
    read = translate(code, details, write=False)
    assert isinstance(read, Unavailable) and not read.outcome_unknown


def test_an_error_in_the_request_stays_a_backend_error() -> None:
    err = translate(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request", write=True)
    assert type(err) is BackendError

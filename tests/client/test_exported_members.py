"""The public names of `lockbroker.client` are pinned, as httpx pins its own (tests/test_exported_members.py).

The client is split into private modules (_keepalive, _session, _lock, aio, ...); what a user imports
must not move with them. Adding a public name means adding it here too, on purpose; a helper that
leaks into the package namespace, or a name dropped from `__all__`, fails this test.
"""

from __future__ import annotations

import types

import lockbroker.client
import lockbroker.client.aio

PUBLIC = [
    "AlreadyQueued",
    "Backoff",
    "Client",
    "DeadlineExceeded",
    "Election",
    "ErrorReason",
    "FenceCheck",
    "Grant",
    "HeldLock",
    "Holder",
    "InvalidArgument",
    "Leader",
    "LeaderChange",
    "Leadership",
    "LimitMismatch",
    "LockBrokerError",
    "LockContext",
    "LockEvent",
    "LockHeld",
    "LockLost",
    "LockState",
    "LockSummary",
    "NoLeader",
    "NotAcquired",
    "NotLeader",
    "NotOwner",
    "PermissionDenied",
    "QuotaExceeded",
    "RequestIdReused",
    "RevisionCompacted",
    "RichStatus",
    "Session",
    "SessionKeeper",
    "SessionLost",
    "SessionNotFound",
    "SessionRevoked",
    "SessionSummary",
    "SyncClient",
    "SyncElection",
    "SyncHeldLock",
    "SyncLeadership",
    "SyncSession",
    "Unauthenticated",
    "Unavailable",
    "WaitExpired",
    "Waiter",
    "from_rpc_error",
    "rich_status",
]

AIO_PUBLIC = ["Client", "DEFAULT_OPTIONS", "HeldLock", "LockContext", "SessionKeeper", "TRANSPORT_ENV", "Transport"]


def test_package_all_is_pinned() -> None:
    assert sorted(lockbroker.client.__all__) == PUBLIC
    assert len(set(lockbroker.client.__all__)) == len(lockbroker.client.__all__)


def test_every_exported_name_resolves() -> None:
    for name in lockbroker.client.__all__:
        assert getattr(lockbroker.client, name, None) is not None, name


def test_nothing_public_is_left_out_of_all() -> None:
    # Submodules (aio, errors, sync, types, cli) are reached by their own path, not exported names.
    public = {
        name
        for name, value in vars(lockbroker.client).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(lockbroker.client.__all__)


def test_aio_module_keeps_its_names() -> None:
    # `from lockbroker.client.aio import Client, HeldLock, ...` worked before the split and still does,
    # naming the very objects the package exports.
    assert sorted(lockbroker.client.aio.__all__) == AIO_PUBLIC
    for name in AIO_PUBLIC:
        value = getattr(lockbroker.client.aio, name)
        if name in lockbroker.client.__all__:
            assert value is getattr(lockbroker.client, name), name

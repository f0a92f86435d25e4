"""Elections behind the same chain as locks: authentication, tenants, principals and audit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from grpc import aio

from lockbroker.v1 import election_pb2, election_pb2_grpc, lock_pb2
from lockbroker.v1.reasons import ErrorReason
from tests.lockutil import expect_error
from tests.test_admin import Env, env

__all__ = ["env"]  # the fixture, imported for this module's tests


def _elect(e: Env) -> Any:
    return election_pb2_grpc.ElectionServiceStub(e.channel)


async def test_unauthenticated_calls_are_refused(env: Env) -> None:
    elect = _elect(env)
    await expect_error(
        elect.Leader(election_pb2.LeaderRequest(name="e")), grpc.StatusCode.UNAUTHENTICATED, ErrorReason.UNAUTHENTICATED
    )
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in elect.Observe(election_pb2.ObserveRequest(name="e")):
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tenants_principals_and_audit(env: Env) -> None:
    elect = _elect(env)
    s = await env.session("acme")
    won = await elect.Campaign(
        election_pb2.CampaignRequest(name="e", session_id=s, value=b"acme-1"), metadata=env.md("acme")
    )
    token = won.grant.fencing_token
    # Another tenant has an election "e" of its own, with nobody leading it.
    await expect_error(
        elect.Leader(election_pb2.LeaderRequest(name="e"), metadata=env.md("ops")),
        grpc.StatusCode.NOT_FOUND,
        ErrorReason.NO_LEADER,
    )
    # Another principal of the same tenant cannot proclaim or resign with this session.
    for call in (
        elect.Proclaim(
            election_pb2.ProclaimRequest(name="e", session_id=s, fencing_token=token, value=b"x"),
            metadata=env.md("acme2"),
        ),
        elect.Resign(election_pb2.ResignRequest(name="e", session_id=s, fencing_token=token), metadata=env.md("acme2")),
    ):
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, ErrorReason.NOT_OWNER)
    leader = await elect.Leader(election_pb2.LeaderRequest(name="e"), metadata=env.md("acme2"))
    assert leader.leader.value == b"acme-1"  # readable by the tenant, unchanged
    await elect.Resign(election_pb2.ResignRequest(name="e", session_id=s, fencing_token=token), metadata=env.md("acme"))
    await env.lock.CloseSession(lock_pb2.CloseSessionRequest(session_id=s), metadata=env.md("acme"))

    async def audited() -> list[dict[str, Any]]:
        for _ in range(50):
            records = env.records("Campaign")
            if records:
                return records
            await asyncio.sleep(0.05)
        return []

    (record,) = await audited()
    assert record["tenant"] == "acme" and record["lock"] == "e" and record["session"] == s
    assert record["fencingToken"] == str(token) and record["outcome"]["code"] == "OK"
    refused = [r for r in env.records("Proclaim") if r["outcome"]["code"] == "PERMISSION_DENIED"]
    assert len(refused) == 1 and refused[0]["outcome"]["reason"] == "NOT_OWNER"
    staged = [json.loads(line) for line in env.audit.read_text().splitlines()]
    assert any(r["method"].endswith("ElectionService/Resign") and r["stage"] == "RequestReceived" for r in staged)

"""`lockbroker check-fence` and `lockbroker admin ...` as real processes against a real broker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lockbroker.client import Client, SessionRevoked
from lockbroker.server.app import Broker
from lockbroker.server.auth import tenants
from lockbroker.server.config import AuthConfig
from lockbroker.server.embedded import EmbeddedEtcd
from tests.conftest import broker_config
from tests.test_cli_client import cli, target_of


@pytest.fixture
async def keyed(etcd: EmbeddedEtcd, key_root: str, tmp_path: Path) -> AsyncIterator[tuple[Broker, dict[str, str]]]:
    path = tmp_path / "tenants.toml"
    keys = {"ops": tenants.add_tenant(path, "ops", admin=True), "acme": tenants.add_tenant(path, "acme")}
    cfg = broker_config(etcd.endpoint, key_root)
    b = Broker(type(cfg)(server=cfg.server, etcd=cfg.etcd, limits=cfg.limits, auth=AuthConfig(str(path))))
    await b.start()
    try:
        yield b, keys
    finally:
        await b.stop(grace=1.0)


async def test_check_fence_and_admin_commands(keyed: tuple[Broker, dict[str, str]]) -> None:
    broker, keys = keyed
    target = target_of(broker)
    async with Client(target, api_key=keys["acme"]) as client, client.session(ttl=30) as s:
        g = await client.acquire("cli/adm", session_id=s.session_id)
        acme = {"LOCKBROKER_API_KEY": keys["acme"]}
        ops = {"LOCKBROKER_API_KEY": keys["ops"]}

        r = await cli(target, "check-fence", "cli/adm", str(g.fencing_token), "-o", "json", **acme)
        assert r.code == 0, r
        assert r.json["status"] == "CURRENT" and r.json["current_fencing_token"] == str(g.fencing_token)

        r = await cli(target, "admin", "force-release", "cli/adm", "--reason", "test", **acme)
        assert r.code == 77, r  # no admin role

        r = await cli(target, "admin", "list-sessions", "--tenant", "acme", "-o", "json", **ops)
        assert r.code == 0, r
        [listed] = r.json["sessions"]
        assert listed["session_id"] == s.session_id
        assert listed["held"] == [{"name": "cli/adm", "fencing_token": str(g.fencing_token)}]

        r = await cli(target, "admin", "force-release", "cli/adm", "--tenant", "acme", "--reason", "INC-7", **ops)
        assert r.code == 0, r
        assert "REVOKED" in r.out

        r = await cli(target, "check-fence", "cli/adm", str(g.fencing_token), **acme)
        assert r.code == 1 and "STALE" in r.out, r

        r = await cli(target, "admin", "force-release", "cli/adm", "--tenant", "acme", "--reason", "again", **ops)
        assert r.code == 4, r  # the lock is free now

        r = await cli(target, "admin", "revoke-session", s.session_id, "--tenant", "acme", "--reason", "bye", **ops)
        assert r.code == 0, r
        with pytest.raises(SessionRevoked):
            await client.refresh(s.session_id)

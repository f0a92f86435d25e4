"""The identity interceptor end to end: real grpc.aio servers on 127.0.0.1, real keys, real certificates."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from lockbroker.interceptors.base import Context, state_of
from lockbroker.interceptors.identity import IdentityInterceptor, certificate_identity, require_admin
from lockbroker.server import status
from lockbroker.server.auth.tenants import TenantRegistry, add_key, add_mtls_identity, add_tenant, load, remove_key
from lockbroker.server.auth.tls import server_credentials
from tests.interceptors.certs import CA, Pair, uri

SERVICE = "lbtest.Echo"
SPIFFE_ACME = "spiffe://example.org/ns/acme/sa/worker"


def _who(context: Context) -> bytes:
    p = state_of(context).principal
    assert p is not None
    return f"{p.tenant}|{p.kind}|{p.id}".encode()


async def who_am_i(request: bytes, context: Context) -> bytes:
    return _who(context)


async def who_am_i_stream(request: bytes, context: Context) -> AsyncIterator[bytes]:
    yield _who(context)
    yield _who(context)


STREAM_CLOSED: dict[str, asyncio.Event] = {}


async def endless(request: bytes, context: Context) -> AsyncIterator[bytes]:
    closed = STREAM_CLOSED.setdefault(request.decode(), asyncio.Event())
    try:
        while True:
            yield _who(context)
            await asyncio.sleep(0.01)
    finally:
        # Still inside the call: the principal is the caller's, not the anonymous default.
        if state_of(context).tenant == "acme":
            closed.set()


async def who_am_i_write(request: bytes, context: Context) -> None:
    await context.write(_who(context))


async def who_am_i_client_stream(requests: AsyncIterator[bytes], context: Context) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
    return _who(context) + f"|{count}".encode()


async def admin_only(request: bytes, context: Context) -> bytes:
    p = await require_admin(context)
    return p.tenant.encode()


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i),
            "WhoAmIStream": grpc.unary_stream_rpc_method_handler(who_am_i_stream),
            "Endless": grpc.unary_stream_rpc_method_handler(endless),
            "WhoAmIWrite": grpc.unary_stream_rpc_method_handler(who_am_i_write),
            "WhoAmIClientStream": grpc.stream_unary_rpc_method_handler(who_am_i_client_stream),
            "Admin": grpc.unary_unary_rpc_method_handler(admin_only),
        },
    )


@dataclass
class World:
    registry: TenantRegistry
    acme_key: str
    ops_key: str
    beta_key: str
    ca: CA
    spiffe_client: Pair
    cn_client: Pair
    stranger: Pair
    plain_port: int
    tls_port: int


async def _server(registry: TenantRegistry, port_for: Any) -> tuple[aio.Server, int]:
    interceptor = IdentityInterceptor.from_registry(registry)
    assert interceptor is not None
    server = aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([_handlers()])
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
    port = port_for(server)
    await server.start()
    return server, port


@pytest.fixture(scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    d = tmp_path_factory.mktemp("identity")
    path = d / "tenants.toml"
    acme_key = add_tenant(path, "acme")
    ops_key = add_tenant(path, "ops", admin=True)
    beta_key = add_tenant(path, "beta")
    add_mtls_identity(path, "acme", SPIFFE_ACME)
    add_mtls_identity(path, "beta", "CN=beta-worker")
    registry = load(path)

    ca = CA()
    spiffe_client = ca.issue("anything", sans=[uri(SPIFFE_ACME)])
    cn_client = ca.issue("beta-worker")
    stranger = ca.issue("stranger")
    server_pair = ca.server_pair()
    cert_file, key_file = server_pair.write(Path(d), "server")
    (d / "ca.pem").write_bytes(ca.pem)
    creds = server_credentials(cert_file, key_file, str(d / "ca.pem"), require_client_cert=True)

    plain, plain_port = await _server(registry, lambda s: s.add_insecure_port("127.0.0.1:0"))
    tls, tls_port = await _server(registry, lambda s: s.add_secure_port("127.0.0.1:0", creds))
    try:
        yield World(registry, acme_key, ops_key, beta_key, ca, spiffe_client, cn_client, stranger, plain_port, tls_port)
    finally:
        await plain.stop(None)
        await tls.stop(None)


def _md(key: str | None = None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return ((("x-api-key", key),) if key else ()) + extra


def _same(data: bytes) -> bytes:
    return data


async def _call(channel: aio.Channel, method: str = "WhoAmI", metadata: Sequence[tuple[str, str]] = ()) -> bytes:
    rpc = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=_same, response_deserializer=_same)
    return await rpc(b"", metadata=metadata, timeout=10)


def _server_stream(channel: aio.Channel, method: str, metadata: Sequence[tuple[str, str]] = ()) -> AsyncIterator[bytes]:
    rpc = channel.unary_stream(f"/{SERVICE}/{method}", request_serializer=_same, response_deserializer=_same)
    return rpc(b"", metadata=metadata, timeout=10).__aiter__()


def _plain(world: World) -> aio.Channel:
    return aio.insecure_channel(f"127.0.0.1:{world.plain_port}")


def _tls(world: World, client: Pair | None) -> aio.Channel:
    creds = grpc.ssl_channel_credentials(world.ca.pem, client.key if client else None, client.cert if client else None)
    return aio.secure_channel(f"127.0.0.1:{world.tls_port}", creds)


def _assert_status(err: aio.AioRpcError, code: grpc.StatusCode, reason: str) -> str:
    assert err.code() == code
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes)
    st = status_pb2.Status.FromString(raw)
    assert st.code == code.value[0]
    (detail,) = st.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == (reason, "lockbroker")
    return err.details() or ""


async def _rejected(channel: aio.Channel, metadata: Sequence[tuple[str, str]] = ()) -> str:
    with pytest.raises(aio.AioRpcError) as info:
        await _call(channel, metadata=metadata)
    return _assert_status(info.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def _id(key: str) -> str:
    return key.split("_")[1]


# --- API keys -------------------------------------------------------------------------------------------


async def test_api_key_acts_for_its_tenant(world: World) -> None:
    async with _plain(world) as ch:
        assert await _call(ch, metadata=_md(world.acme_key)) == f"acme|api-key|{_id(world.acme_key)}".encode()
        assert await _call(ch, metadata=_md(world.beta_key)) == f"beta|api-key|{_id(world.beta_key)}".encode()


async def test_bad_credentials_get_one_answer_without_hints(world: World) -> None:
    acme_id = _id(world.acme_key)
    async with _plain(world) as ch:
        messages = {
            await _rejected(ch),
            await _rejected(ch, _md(f"lbk_{acme_id}_" + "x" * 43)),  # known id, wrong secret
            await _rejected(ch, _md("lbk_ffffffffffff_" + "x" * 43)),  # unknown id
            await _rejected(ch, _md("not-a-key")),
            await _rejected(ch, _md(world.acme_key.upper())),
            await _rejected(ch, _md(world.acme_key, ("x-api-key", world.beta_key))),  # two keys
            await _rejected(ch, (("authorization", f"Bearer {world.acme_key}"),)),
        }
    assert messages == {"missing or invalid credentials"}


async def test_client_supplied_tenant_is_ignored(world: World) -> None:
    async with _plain(world) as ch:
        got = await _call(ch, metadata=_md(world.acme_key, ("x-tenant", "beta"), ("tenant", "beta")))
        assert got.startswith(b"acme|")
        await _rejected(ch, (("x-tenant", "acme"),))


async def test_streams_see_the_principal(world: World) -> None:
    expected = f"acme|api-key|{_id(world.acme_key)}".encode()
    async with _plain(world) as ch:
        assert [r async for r in _server_stream(ch, "WhoAmIStream", _md(world.acme_key))] == [expected, expected]
        assert [r async for r in _server_stream(ch, "WhoAmIWrite", _md(world.acme_key))] == [expected]

        async def requests() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x"

        upload = ch.stream_unary(
            f"/{SERVICE}/WhoAmIClientStream", request_serializer=_same, response_deserializer=_same
        )
        assert await upload(requests(), metadata=_md(world.acme_key), timeout=10) == expected + b"|3"
        with pytest.raises(aio.AioRpcError) as info:
            _ = [r async for r in _server_stream(ch, "WhoAmIStream")]
        _assert_status(info.value, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


async def test_a_cancelled_stream_is_closed_in_its_call(world: World, caplog: pytest.LogCaptureFixture) -> None:
    async with _plain(world) as ch:
        rpc = ch.unary_stream(f"/{SERVICE}/Endless", request_serializer=_same, response_deserializer=_same)
        call = rpc(b"cancel-me", metadata=_md(world.acme_key), timeout=10)
        first, second = await call.read(), await call.read()
        assert isinstance(first, bytes) and first.startswith(b"acme|") and first == second
        call.cancel()
        await asyncio.wait_for(STREAM_CLOSED["cancel-me"].wait(), 5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_admin_role(world: World) -> None:
    async with _plain(world) as ch:
        assert await _call(ch, "Admin", _md(world.ops_key)) == b"ops"
        with pytest.raises(aio.AioRpcError) as info:
            await _call(ch, "Admin", _md(world.acme_key))
        _assert_status(info.value, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_health_and_reflection_need_no_credentials(world: World) -> None:
    async with _plain(world) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name async for r in stream for s in r.list_services_response.service}
        assert SERVICE in services


async def test_a_reloaded_registry_forgets_a_removed_key(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    first = add_tenant(path, "acme")
    second = add_key(path, "acme")
    old = IdentityInterceptor(load(path))
    assert await old.registry.authenticate_key(first) is not None  # now cached in the old registry
    remove_key(path, _id(first))
    new = IdentityInterceptor(load(path))
    assert await new.registry.authenticate_key(first) is None
    assert await new.registry.authenticate_key(second) is not None


def test_no_registry_no_interceptor(tmp_path: Path) -> None:
    assert IdentityInterceptor.from_registry(None) is None
    assert IdentityInterceptor.from_registry(TenantRegistry()) is None
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert IdentityInterceptor.from_registry(load(empty)) is None
    assert status.DOMAIN == "lockbroker"


# --- mutual TLS -------------------------------------------------------------------------------------------


async def test_spiffe_certificate_acts_for_its_tenant(world: World) -> None:
    async with _tls(world, world.spiffe_client) as ch:
        assert await _call(ch) == f"acme|mtls|{SPIFFE_ACME}".encode()
        # A client-supplied tenant changes nothing here either.
        assert await _call(ch, metadata=(("x-tenant", "beta"),)) == f"acme|mtls|{SPIFFE_ACME}".encode()


async def test_cn_certificate_acts_for_its_tenant(world: World) -> None:
    async with _tls(world, world.cn_client) as ch:
        assert await _call(ch) == b"beta|mtls|CN=beta-worker"


async def test_unknown_certificate_is_unauthenticated_but_may_use_health(world: World) -> None:
    async with _tls(world, world.stranger) as ch:
        assert await _rejected(ch) == "missing or invalid credentials"
        await _rejected(ch, (("x-tenant", "acme"),))
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A transport-only certificate plus an API key: the key names the tenant.
        assert (await _call(ch, metadata=_md(world.beta_key))).startswith(b"beta|api-key|")


async def test_certificate_with_two_uri_sans_has_no_identity(world: World) -> None:
    # Not a valid SPIFFE SVID: grpc withholds peer_spiffe_id, and its CN (a registered one) is not used instead.
    odd = world.ca.issue("beta-worker", sans=[uri(SPIFFE_ACME), uri("https://example.org/other")])
    async with _tls(world, odd) as ch:
        await _rejected(ch)


async def test_certificate_and_key_must_agree(world: World) -> None:
    async with _tls(world, world.spiffe_client) as ch:
        assert (await _call(ch, metadata=_md(world.acme_key))).startswith(b"acme|api-key|")
        await _rejected(ch, _md(world.beta_key))  # cert says acme, key says beta
        await _rejected(ch, _md("lbk_ffffffffffff_" + "x" * 43))  # a bad key is not rescued by the cert


async def test_no_client_certificate_no_connection(world: World) -> None:
    async with _tls(world, None) as ch:
        with pytest.raises(aio.AioRpcError) as info:
            await _call(ch, metadata=_md(world.acme_key))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_identity_rules() -> None:
    # Shapes as grpcio 1.85 reports them (see the module docstring of identity).
    assert certificate_identity({"peer_spiffe_id": [b"spiffe://a/b"], "x509_common_name": [b"x"]}) == "spiffe://a/b"
    assert certificate_identity({"x509_common_name": [b"acme-worker"]}) == "CN=acme-worker"
    # Two URI SANs: grpc sets no peer_spiffe_id; the CN is not used in its place.
    assert (
        certificate_identity({"peer_uri": [b"spiffe://a/b", b"https://x/y"], "x509_common_name": [b"acme-worker"]})
        is None
    )
    assert certificate_identity({"peer_uri": [b"https://x/y"], "x509_common_name": [b"w"]}) == "CN=w"
    assert certificate_identity({"transport_security_type": [b"insecure"]}) is None
    assert certificate_identity({"x509_common_name": [b""]}) is None

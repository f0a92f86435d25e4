"""The tenants file: key hashing, the file round trip, and the errors a broken file gets."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import threading
import tomllib
from pathlib import Path

import pytest

from lockbroker.interceptors.principal import Principal
from lockbroker.server.auth import tenants as t
from lockbroker.server.auth.tenants import (
    ApiKeyRecord,
    Tenant,
    TenantRegistry,
    TenantsFileError,
    add_key,
    add_mtls_identity,
    add_tenant,
    hash_key,
    load,
    parse,
    parse_key,
    remove_key,
    verify_hash,
)

# --- hashing ---------------------------------------------------------------------------------------


def test_hash_verifies_only_its_key_and_is_salted() -> None:
    _, key = t.new_key()
    h1, h2 = hash_key(key), hash_key(key)
    assert h1.startswith("scrypt$ln=14,r=8,p=1$")
    assert h1 != h2  # a fresh salt each time
    assert key not in h1
    assert verify_hash(key, h1)
    assert verify_hash(key, h2)
    assert not verify_hash(key[:-1] + ("A" if key[-1] != "A" else "B"), h1)
    assert not verify_hash(key, "scrypt$ln=14,r=8,p=1$bad$bad")
    assert not verify_hash("lbk_é", h1)


def test_hash_parameters_travel_with_the_hash() -> None:
    _, key = t.new_key()
    cheap = hash_key(key, log2_n=10, r=4, p=1)
    assert cheap.startswith("scrypt$ln=10,r=4,p=1$")
    assert verify_hash(key, cheap)


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ("bcrypt$x$y$z", "is not of the form"),
        ("scrypt$ln=14,r=8$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0", "parameters other than"),
        ("scrypt$ln=14,r=8,p=1,q=2$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0", "unknown scrypt parameter"),
        ("scrypt$ln=24,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZGlnZXN0", "outside the supported range"),
        ("scrypt$ln=14,r=8,p=1$c2FsdA$ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0", "needs a salt"),
        ("scrypt$ln=14,r=8,p=1$!!!!$ZGlnZXN0", "not base64url"),
    ],
)
def test_bad_hash_strings(stored: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        t.ScryptHash.parse(stored)


def test_key_format() -> None:
    key_id, key = t.new_key()
    assert key.startswith(f"lbk_{key_id}_")
    assert parse_key(key) == (key_id, key[len(f"lbk_{key_id}_") :])
    # The secret may itself contain "_": the id ends at the first one.
    assert parse_key("lbk_abcd_" + "x_" * 20) == ("abcd", "x_" * 20)
    for bad in (
        "",
        "lbk_",
        "lbk_abcd",
        "lbk_abcd_short",
        "xyz_abcd_" + "a" * 40,
        "lbk_ABCD_" + "a" * 40,
        "lbk_abcd_" + "a" * 200,
        "lbk_abcd_" + "a" * 39 + "!",
    ):
        assert parse_key(bad) is None, bad


# --- registry ---------------------------------------------------------------------------------------


def _tenant(name: str, key: str, key_id: str, *, admin: bool = False, ids: tuple[str, ...] = ()) -> Tenant:
    return Tenant(name, admin, (ApiKeyRecord(key_id, hash_key(key, log2_n=10), ""),), ids)


def test_registry_verifies_by_id_and_maps_identities() -> None:
    key_id, key = t.new_key()
    reg = TenantRegistry([_tenant("acme", key, key_id, admin=True, ids=("CN=acme-worker",))])
    assert reg.verify_key(key) == Principal("acme", "api-key", key_id, True)
    assert reg.verify_key(t.new_key(key_id)[1]) is None  # right id, wrong secret
    assert reg.verify_key(t.new_key()[1]) is None  # unknown id
    assert reg.for_identity("CN=acme-worker") == Principal("acme", "mtls", "CN=acme-worker", True)
    assert reg.for_identity("CN=other") is None
    assert len(reg) == 1
    assert [x.name for x in reg] == ["acme"]


class CountingRegistry(TenantRegistry):
    """The real registry, counting how often it pays for a scrypt."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.verifications = 0
        self._count_lock = threading.Lock()

    def verify_key(self, key: str) -> Principal | None:
        with self._count_lock:
            self.verifications += 1
        return super().verify_key(key)


async def test_authenticate_caches_successes_only_and_shares_concurrent_work() -> None:
    key_id, key = t.new_key()
    reg = CountingRegistry([_tenant("acme", key, key_id)], cache_ttl=0.3)
    results = await asyncio.gather(*(reg.authenticate_key(key) for _ in range(8)))
    assert {r.tenant for r in results if r} == {"acme"} and all(results)
    assert reg.verifications == 1  # eight concurrent first calls, one scrypt
    assert await reg.authenticate_key(key) is not None
    assert reg.verifications == 1  # cached
    wrong = t.new_key(key_id)[1]
    assert await reg.authenticate_key(wrong) is None
    assert await reg.authenticate_key(wrong) is None
    # A failure is remembered too (issue 18, item 6): a client retrying a wrong key costs one
    # scrypt, and a wrong key is never taken for right (the success cache is separate).
    assert reg.verifications == 2
    assert await reg.authenticate_key(t.new_key()[1]) is None
    assert reg.verifications == 3  # an unknown id costs what a wrong secret costs: no timing oracle
    assert await reg.authenticate_key("not a key") is None
    assert reg.verifications == 3  # a malformed key costs no scrypt (the format is public)
    await asyncio.sleep(0.35)
    assert await reg.authenticate_key(key) is not None
    assert reg.verifications == 4  # the cached success expired


async def test_authenticate_does_not_block_the_event_loop() -> None:
    key_id, key = t.new_key()
    reg = TenantRegistry([Tenant("acme", False, (ApiKeyRecord(key_id, hash_key(key), ""),))], cache_ttl=0)
    task = asyncio.create_task(reg.authenticate_key(key))
    turns = 0
    while not task.done():
        await asyncio.sleep(0)
        turns += 1
    assert task.result() is not None
    # A full-cost scrypt (tens of ms) ran in a thread while the loop kept turning; on the loop it
    # would have finished within a handful of turns.
    assert turns > 50


def test_registry_refuses_conflicts() -> None:
    key_id, key = t.new_key()
    with pytest.raises(TenantsFileError, match="already used by tenant 'a'"):
        TenantRegistry([_tenant("a", key, key_id), _tenant("b", key, key_id)])
    with pytest.raises(TenantsFileError, match="already mapped to tenant 'a'"):
        TenantRegistry([Tenant("a", mtls_identities=("CN=x",)), Tenant("b", mtls_identities=("CN=x",))])
    with pytest.raises(TenantsFileError, match="name must be"):
        TenantRegistry([Tenant("Bad Name")])


# --- the file -----------------------------------------------------------------------------------------


def test_add_tenant_creates_a_private_file_with_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    key = add_tenant(path, "acme")
    admin_key = add_tenant(path, "ops", admin=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text and admin_key not in text
    assert parse_key(key)[1] not in text  # type: ignore[index]
    assert text.startswith("# lockbroker tenants file")
    doc = tomllib.loads(text)
    assert doc["tenants"]["acme"]["admin"] is False and doc["tenants"]["ops"]["admin"] is True
    (record,) = doc["tenants"]["acme"]["api_keys"]
    assert key.startswith(f"lbk_{record['id']}_") and record["hash"].startswith("scrypt$")
    assert record["created"].endswith("Z")
    reg = load(path)
    assert reg.verify_key(key) == Principal("acme", "api-key", record["id"], False)
    assert reg.verify_key(admin_key) is not None and reg.verify_key(admin_key).admin  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == ["tenants.toml"]  # no temp or lock files left


def test_keys_rotate_and_revoke(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    first = add_tenant(path, "acme")
    second = add_key(path, "acme")
    assert first != second
    reg = load(path)
    assert reg.verify_key(first) and reg.verify_key(second)
    assert remove_key(path, parse_key(first)[0]) == "acme"  # type: ignore[index]
    reg = load(path)
    assert reg.verify_key(first) is None and reg.verify_key(second) is not None
    with pytest.raises(TenantsFileError, match="no api key with id"):
        remove_key(path, parse_key(first)[0])  # type: ignore[index]


def test_identities_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    odd = 'CN=Ünïcode "quoted" \\ back'
    add_mtls_identity(path, "acme", "spiffe://example.org/ns/acme/sa/worker")
    add_mtls_identity(path, "acme", odd)
    add_mtls_identity(path, "acme", odd)  # idempotent
    reg = load(path)
    assert reg.tenants["acme"].mtls_identities == ("spiffe://example.org/ns/acme/sa/worker", odd)
    assert reg.for_identity(odd) is not None
    with pytest.raises(TenantsFileError, match=re.escape('must be "spiffe://..."')):
        add_mtls_identity(path, "acme", "acme-worker")
    with pytest.raises(TenantsFileError, match="no tenant 'nobody'"):
        add_mtls_identity(path, "nobody", "CN=x")


def test_writers_refuse_mistakes_and_leave_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    before = path.read_bytes()
    with pytest.raises(TenantsFileError, match="already exists"):
        add_tenant(path, "acme", admin=True)
    with pytest.raises(TenantsFileError, match="no tenant 'nobody'"):
        add_key(path, "nobody")
    with pytest.raises(TenantsFileError, match="tenant name 'Acme!'"):
        add_tenant(path, "Acme!")
    assert path.read_bytes() == before
    with pytest.raises(TenantsFileError, match="does not exist"):
        add_tenant(tmp_path / "missing-dir" / "tenants.toml", "acme")
    # A file the broker would refuse is not "fixed" by rewriting it.
    path.write_text(before.decode() + "\n[tenants.broken]\nadmin = 3\n")
    broken = path.read_bytes()
    with pytest.raises(TenantsFileError, match="admin must be true or false"):
        add_key(path, "acme")
    assert path.read_bytes() == broken


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    keys: list[str] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            keys.append(add_key(path, "acme"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(load(path).tenants["acme"].api_keys) == 5


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    assert len(load(empty)) == 0
    with pytest.raises(TenantsFileError, match=r"tenants file .*missing\.toml: not found"):
        load(tmp_path / "missing.toml")
    unreadable = tmp_path / "binary.toml"
    unreadable.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TenantsFileError, match="not UTF-8"):
        load(unreadable)


GOOD_HASH = hash_key("lbk_abcd_" + "a" * 43, log2_n=10)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tenants.acme]\nadmin = "yes\n', r"F: .*line 2"),
        ("[tenants.acme]\nadmin = false\n\n[tenants.Bad]\n", r"F:4: \[tenants.Bad\]: tenant name must be"),
        ("[tenants.acme]\nadmn = true\n", r"F:1: \[tenants.acme\]: unknown key\(s\) \['admn'\]"),
        ("[tenants.acme]\nadmin = 1\n", r"F:1: \[tenants.acme\]: admin must be true or false"),
        ("[tenants.acme]\napi_keys = 'k'\n", r"F:1: \[tenants.acme\]: api_keys must be an array"),
        ("[tenants.acme]\napi_keys = [{id = 'abcd'}]\n", r"api_keys\[0\]: id and hash are required"),
        ("[tenants.acme]\napi_keys = [{id = 'abcd', hash = 'x', secret = 'y'}]\n", r"unknown key\(s\) \['secret'\]"),
        (f"[tenants.acme]\napi_keys = [{{id = 'abcd', hash = '{GOOD_HASH}', created = 'today'}}]\n", "RFC 3339"),
        ("[tenants.acme]\napi_keys = [{id = 'abcd', hash = 'plain'}]\n", r"F:2: .*'abcd': hash is not of the form"),
        (f"[tenants.acme]\napi_keys = [{{id = 'AB', hash = '{GOOD_HASH}'}}]\n", r"F:2: .*id 'AB' must be 4-32"),
        (
            f"[tenants.a]\napi_keys = [{{id = 'abcd', hash = '{GOOD_HASH}'}}]\n\n"
            f"[tenants.b]\nadmin = false\napi_keys = [{{id = 'abcd', hash = '{GOOD_HASH}'}}]\n",
            r"F:6: tenant 'b': api key id 'abcd' is already used by tenant 'a'",
        ),
        (
            '[tenants.a]\nmtls_identities = ["CN=x"]\n[tenants.b]\nmtls_identities = ["CN=y", "CN=x"]\n',
            r"F:4: tenant 'b': mTLS identity 'CN=x' is already mapped to tenant 'a'",
        ),
        ('[tenants.a]\nmtls_identities = ["acme"]\n', r"F:2: tenant 'a': mTLS identity 'acme' must be"),
        ('[tenants.a]\nmtls_identities = ["spiffe://Example.org/x"]\n', "is not a SPIFFE ID"),
        ('[tenants.a]\nmtls_identities = ["CN=x", "CN=x"]\n', "lists an identity twice"),
        ("[tenant.acme]\n", r"unknown top-level key\(s\) \['tenant'\]"),
        ("tenants = 3\n", "tenants must be a table"),
    ],
)
def test_bad_files_name_the_place(text: str, message: str) -> None:
    with pytest.raises(TenantsFileError, match=message):
        parse(text, "F")


def test_hand_written_file_with_native_datetime_loads(tmp_path: Path) -> None:
    key = "lbk_k1a2b3_" + "s" * 43
    path = tmp_path / "t.toml"
    path.write_text(
        "# written by hand\n"
        "[tenants.acme]\n"
        "admin = false\n"
        f'api_keys = [{{id = "k1a2b3", hash = "{hash_key(key, log2_n=10)}", created = 2026-11-23T02:28:09Z}}]\n'
        'mtls_identities = ["spiffe://example.org/ns/acme/sa/worker", "CN=acme-worker"]\n'
    )
    os.chmod(path, 0o600)
    reg = load(path)
    assert reg.verify_key(key) == Principal("acme", "api-key", "k1a2b3", False)
    assert reg.tenants["acme"].api_keys[0].created.startswith("2026-11-23T02:28:09")

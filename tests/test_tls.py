"""TLS credential files: good ones load, bad ones are refused naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from lockbroker.server.auth.tls import TlsFileError, channel_credentials, server_credentials
from tests.interceptors.certs import CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca, other = CA(), CA("another CA")
    (d / "ca.pem").write_bytes(ca.pem)
    server_cert, server_key = ca.server_pair().write(d, "server")
    client_cert, client_key = ca.issue("c").write(d, "client")
    _, other_key = other.issue("x").write(d, "other")
    _, enc_key = ca.issue("e", password=b"secret").write(d, "encrypted")
    (d / "junk.pem").write_text("hello\n")
    return {
        "dir": str(d),
        "ca": str(d / "ca.pem"),
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
        "other_key": other_key,
        "encrypted_key": enc_key,
        "junk": str(d / "junk.pem"),
    }


def test_good_files(pki: dict[str, str]) -> None:
    assert isinstance(server_credentials(pki["server_cert"], pki["server_key"]), grpc.ServerCredentials)
    assert isinstance(
        server_credentials(pki["server_cert"], pki["server_key"], pki["ca"], require_client_cert=True),
        grpc.ServerCredentials,
    )
    assert isinstance(channel_credentials(pki["ca"]), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"]), grpc.ChannelCredentials)
    assert isinstance(channel_credentials(), grpc.ChannelCredentials)


def test_bad_files_are_named(pki: dict[str, str]) -> None:
    missing = str(Path(pki["dir"]) / "nope.pem")
    cases: list[tuple[dict[str, object], str]] = [
        ({"cert_file": missing, "key_file": pki["server_key"]}, r"certificate file .*nope\.pem: not found"),
        ({"cert_file": pki["dir"], "key_file": pki["server_key"]}, "is a directory"),
        ({"cert_file": pki["junk"], "key_file": pki["server_key"]}, r"junk\.pem: not a PEM file"),
        ({"cert_file": pki["server_key"], "key_file": pki["server_key"]}, "holds no PEM certificate"),
        ({"cert_file": pki["server_cert"], "key_file": pki["server_cert"]}, "holds no PEM private key"),
        ({"cert_file": pki["server_cert"], "key_file": pki["other_key"]}, r"other\.key does not belong to"),
        ({"cert_file": pki["server_cert"], "key_file": pki["encrypted_key"]}, "the key is encrypted"),
        (
            {
                "cert_file": pki["server_cert"],
                "key_file": pki["server_key"],
                "client_ca_file": pki["junk"],
                "require_client_cert": True,
            },
            r"client CA file .*junk\.pem: not a PEM file",
        ),
        (
            {
                "cert_file": pki["server_cert"],
                "key_file": pki["server_key"],
                "client_ca_file": pki["server_key"],
                "require_client_cert": True,
            },
            "holds no PEM certificate",
        ),
        (
            {"cert_file": pki["server_cert"], "key_file": pki["server_key"], "require_client_cert": True},
            "needs a client CA",
        ),
        (
            {"cert_file": pki["server_cert"], "key_file": pki["server_key"], "client_ca_file": pki["ca"]},
            "cannot ask for an optional client certificate",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(TlsFileError, match=message):
            server_credentials(**kwargs)  # type: ignore[arg-type]


def test_bad_channel_files(pki: dict[str, str]) -> None:
    with pytest.raises(TlsFileError, match="both a certificate file and a key file"):
        channel_credentials(pki["ca"], cert_file=pki["client_cert"])
    with pytest.raises(TlsFileError, match=r"CA file .*junk\.pem"):
        channel_credentials(pki["junk"])
    with pytest.raises(TlsFileError, match="does not belong to"):
        channel_credentials(pki["ca"], pki["client_cert"], pki["other_key"])

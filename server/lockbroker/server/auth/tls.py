"""gRPC TLS credentials from PEM files, checked up front so a bad file fails at start with its name.

grpcio only reports a broken certificate, key or CA when a handshake fails, and then only in its C
log. The stdlib `ssl` module parses the same PEM with the same OpenSSL, so it is used here to say
which file is wrong and why (missing, unreadable, not PEM, encrypted key, key not matching the
certificate) before grpcio ever sees the bytes.

Client certificates: grpcio's Python API can only *require* one or *not ask* for one (there is no
"request and verify if sent"); with `require_client_cert=False` the server never asks, so no client
has a certificate identity. Hence a client CA without `require_client_cert` is refused rather than
silently ignored.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc


class TlsFileError(ValueError):
    """A TLS file is missing, unreadable or not what it should be; the message names it."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsFileError(f"{what} {path}: not found") from None
    except IsADirectoryError:
        raise TlsFileError(f"{what} {path}: is a directory") from None
    except PermissionError:
        raise TlsFileError(f"{what} {path}: permission denied") from None
    except OSError as e:
        raise TlsFileError(f"{what} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsFileError(f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


def _no_passphrase() -> str:
    raise TlsFileError("encrypted")


def _check_pair(cert_file: str, key_file: str, cert: bytes, key: bytes) -> None:
    if b"CERTIFICATE-----" not in cert:
        raise TlsFileError(f"certificate file {cert_file}: holds no PEM certificate")
    if b"ENCRYPTED PRIVATE KEY-----" in key or b"Proc-Type: 4,ENCRYPTED" in key:
        raise TlsFileError(f"key file {key_file}: the key is encrypted; gRPC needs an unencrypted key (mode 0600)")
    if b"PRIVATE KEY-----" not in key:
        raise TlsFileError(f"key file {key_file}: holds no PEM private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except TlsFileError:
        raise TlsFileError(f"key file {key_file}: the key is encrypted; gRPC needs an unencrypted key") from None
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsFileError(f"key file {key_file} does not belong to the certificate in {cert_file}") from None
        raise TlsFileError(f"certificate {cert_file} / key {key_file}: {e.reason or e}") from None


def _check_ca(ca_file: str, ca: bytes) -> None:
    if b"CERTIFICATE-----" not in ca:
        raise TlsFileError(f"CA file {ca_file}: holds no PEM certificate")
    try:
        ssl.create_default_context(cadata=ca.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise TlsFileError(f"CA file {ca_file}: not a valid PEM certificate bundle ({e})") from None


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str | None = None, require_client_cert: bool = False
) -> grpc.ServerCredentials:
    """TLS (and with a client CA, mutual TLS) credentials for `server.add_secure_port`.

    With `client_ca_file` and `require_client_cert`, every connection must present a certificate signed
    by that CA; the identity interceptor reads its SPIFFE ID or CN. API-key clients then need one too.
    """
    if require_client_cert and not client_ca_file:
        raise TlsFileError("requiring client certificates needs a client CA file to verify them against")
    if client_ca_file and not require_client_cert:
        raise TlsFileError(
            f"client CA file {client_ca_file} given without requiring client certificates: grpcio cannot ask "
            "for an optional client certificate, so no client identity would ever be seen; require them or "
            "drop the client CA"
        )
    cert, key = _read(cert_file, "certificate file"), _read(key_file, "key file")
    _check_pair(cert_file, key_file, cert, key)
    ca = None
    if client_ca_file:
        ca = _read(client_ca_file, "client CA file")
        _check_ca(client_ca_file, ca)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=require_client_cert)


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Client-side TLS: `ca_file` to verify the broker (None: the system roots), and an optional client pair."""
    if (cert_file is None) != (key_file is None):
        raise TlsFileError("a client certificate needs both a certificate file and a key file")
    ca = None
    if ca_file:
        ca = _read(ca_file, "CA file")
        _check_ca(ca_file, ca)
    cert = key = None
    if cert_file and key_file:
        cert, key = _read(cert_file, "certificate file"), _read(key_file, "key file")
        _check_pair(cert_file, key_file, cert, key)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

"""Credentials as the tenants file writes them: API keys (their form, their scrypt hashes) and mTLS
identities. Pure functions of a key or a string; the registry that maps them to tenants, and the
file, are tenants.py's.

An API key reads `lbk_<id>_<secret>`. The id is a lookup handle, not a secret (it is what logs and audit
records name); the 256-bit secret carries all the strength. Only a salted scrypt hash of the whole key is
stored, so a key is shown exactly once, by `add_tenant`/`add_key`, and is unrecoverable from the file.

Why scrypt (n=2^14, r=8, p=1, the scrypt paper's interactive-login setting, about 40 ms and 16 MiB here):
it is memory-hard, in hashlib, and its parameters travel inside each hash string, so they can be changed
for new keys without touching old ones. With 256-bit random secrets no work factor is what stops brute
force; the cost is paid on every uncached verification, so checks are cached, bounded and
scheduled by `keycheck.KeyChecker` (see `TenantRegistry.authenticate_key`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass, replace

KEY_PREFIX = "lbk_"
_KEY_ID = re.compile(r"[a-z0-9]{4,32}")
_KEY_SECRET = re.compile(r"[A-Za-z0-9_\-]{32,128}")
_MAX_KEY_LEN = len(KEY_PREFIX) + 32 + 1 + 128
_B64URL = re.compile(r"[A-Za-z0-9_\-]+")
_SPIFFE = re.compile(r"spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)*")

# Default scrypt cost for new keys; old keys keep whatever their hash string says.
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
# Bounds for parameters read from the file: a typo such as ln=24 would otherwise make every
# verification take seconds and a gigabyte.
_MAX_SCRYPT_MEMORY = 64 * 1024 * 1024
_SALT_BYTES = 16
_DIGEST_BYTES = 32


def key_id_problem(key_id: str) -> str | None:
    """Why `key_id` cannot be an API key's id, or None."""
    return None if _KEY_ID.fullmatch(key_id) else "must be 4-32 of a-z 0-9"


def unmatchable_hash() -> ScryptHash:
    """A hash at the default cost with a random digest, which no key matches: checked against for
    well-formed keys whose id is unknown, so that they cost what a wrong secret costs."""
    return ScryptHash(SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, os.urandom(_SALT_BYTES), os.urandom(_DIGEST_BYTES))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # The stdlib decoder skips characters outside the alphabet; a hash with any is corrupt, not short.
    if not _B64URL.fullmatch(text):
        raise ValueError(text)
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @staticmethod
    def parse(text: str) -> ScryptHash:
        """Raises ValueError (with a message fit for the file's error) when `text` is not a usable hash."""
        parts = text.split("$")
        if len(parts) != 4 or parts[0] != "scrypt":
            raise ValueError('is not of the form "scrypt$ln=N,r=N,p=N$<salt>$<digest>"')
        try:
            params = dict(kv.split("=", 1) for kv in parts[1].split(","))
            log2_n, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
        except (KeyError, ValueError):
            raise ValueError('has parameters other than "ln=N,r=N,p=N"') from None
        if params:
            raise ValueError(f"has unknown scrypt parameter(s) {sorted(params)}")
        if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 4) or 128 * r * (2**log2_n) > _MAX_SCRYPT_MEMORY:
            raise ValueError(f"has scrypt parameters outside the supported range (at most {_MAX_SCRYPT_MEMORY} bytes)")
        try:
            salt, digest = _unb64(parts[2]), _unb64(parts[3])
        except ValueError:
            raise ValueError("has a salt or digest that is not base64url") from None
        if len(salt) < _SALT_BYTES or len(digest) < _DIGEST_BYTES:
            raise ValueError(f"needs a salt of at least {_SALT_BYTES} and a digest of at least {_DIGEST_BYTES} bytes")
        return ScryptHash(log2_n, r, p, salt, digest)

    def __str__(self) -> str:
        return f"scrypt$ln={self.log2_n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.digest)}"

    def _derive(self, secret: bytes, length: int) -> bytes:
        n = 2**self.log2_n
        # OpenSSL needs 128*r*(n+2) bytes for V plus 128*r*p for B; a little slack for its bookkeeping.
        maxmem = 128 * self.r * (n + 2 + self.p) + 65536
        return hashlib.scrypt(secret, salt=self.salt, n=n, r=self.r, p=self.p, maxmem=maxmem, dklen=length)

    def matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(self._derive(secret, len(self.digest)), self.digest)


def hash_key(key: str, *, log2_n: int = SCRYPT_LOG2_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The storable hash of `key`, under a fresh random salt."""
    h = ScryptHash(log2_n, r, p, os.urandom(_SALT_BYTES), b"")
    return str(replace(h, digest=h._derive(key.encode("ascii"), _DIGEST_BYTES)))


def verify_hash(key: str, stored: str) -> bool:
    try:
        return ScryptHash.parse(stored).matches(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False


def parse_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed `lbk_<id>_<secret>`, else None. Cheap: runs before any hashing."""
    if len(key) > _MAX_KEY_LEN or not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not _KEY_ID.fullmatch(key_id) or not _KEY_SECRET.fullmatch(secret):
        return None
    return key_id, secret


def new_key(key_id: str | None = None) -> tuple[str, str]:
    """(id, plaintext key) for a fresh key; 48-bit ids, 256-bit secrets."""
    key_id = key_id or secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def mtls_identity_problem(identity: str) -> str | None:
    if identity.startswith("spiffe://"):
        if not _SPIFFE.fullmatch(identity):
            return "is not a SPIFFE ID (spiffe://<lowercase trust domain>/<path>)"
        return None
    if identity.startswith("CN="):
        cn = identity[3:]
        if not cn or cn != cn.strip() or any(not ch.isprintable() for ch in cn):
            return "has an empty, padded or non-printable common name"
        return None
    return 'must be "spiffe://..." (a SPIFFE ID in the URI SAN) or "CN=<subject common name>"'


__all__ = [
    "KEY_PREFIX",
    "SCRYPT_LOG2_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "ScryptHash",
    "hash_key",
    "key_id_problem",
    "mtls_identity_problem",
    "new_key",
    "parse_key",
    "unmatchable_hash",
    "verify_hash",
]

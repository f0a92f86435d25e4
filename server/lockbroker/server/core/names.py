"""What a lock name, request id, owner label and session id may be, and where each lives in etcd.

Key layout, under a configurable root (default "/lockbroker/v1"):

    <root>/t/<tenant>/s/<lease hex>          a session record, bound to the session's lease
    <root>/t/<tenant>/l/<key name>#<lease hex>[.<claim>]
                                             one queue entry (claim) of lock <name>, bound to its
                                             session's lease; ".<claim>" only on claims made with
                                             new_claim ("c<request id>") or reentrant
                                             ("r<owner digest>"), see core.acquire
    <root>/t/<tenant>/m/<lease hex>/<b>      one of the session's release marks (b: 2 hex digits, a hash
                                             of the entry key, see model.mark_key): rewritten whenever the
                                             broker deletes an entry of the session that hashes to it
                                             (see LockBackend.enqueue)
    <root>/t/<tenant>/r/<lease hex>/<token>  an admin's revocation of grant <token> of the session, bound
                                             to its lease: the session's keepalives report it (core.admin)
    <root>/t/<tenant>/x/<lease hex>          an admin's revocation of the whole session, on a lease of its
                                             own (REVOKED_SESSION_TTL), so Refresh can say REVOKED
    <root>/t/<tenant>/d/<key name>#p<token>  the lock-delay of grant <token> of lock <name>, no lease:
                                             deleted by a clean release, started when the grant is
                                             lost (core.delay)
    <root>/t/<tenant>/q/s/<i>                quota slot i of the tenant's sessions (see core.quota)
    <root>/t/<tenant>/q/e/<i>                quota slot i of the tenant's queue entries
    <root>/t/<tenant>/q/l/<key name>#<i>     quota slot i of lock <name>'s queue

A lock name is any UTF-8 text without control characters, up to a configurable size (see
name_problem). Its <key name> is its UTF-8 with every byte from 0x00 to 0x24 written as "$" and
two upper-case hex digits ("a b" -> "a$20b", "a#b" -> "a$23b", "a$b" -> "a$24b"); every other byte
is itself. Why this escape:

- Names of the alphabet accepted before any-UTF-8 names (A-Z a-z 0-9, "-_.:@+=,~%" and "/") have
  no byte below 0x25, so they map to exactly the key they always had: locks survive an upgrade,
  and old and new replicas can serve the same keys side by side. "%" is in that alphabet, so it
  cannot be the escape; "$" is not.
- "#" never occurs in a key name, so the entries of one lock are exactly the keys with prefix
  "<root>/t/<tenant>/l/<key name>#": lock "a" can never see the entries of lock "a/b" or "a#b".
- It is a prefix code applied byte by byte: name P is a prefix of name N exactly when key name
  P is a prefix of key name N, so List's prefix filter is one etcd range.
- It keeps order: every escape starts with "$" (0x24), above the separator "#" (0x23) and below
  every byte left as is, and the escaped bytes are 0x00-0x24 in hex order. So the keys of two
  locks compare as their names' UTF-8 bytes compare, which is code point order (Python's str
  order): List pages through names in that order by walking keys.
"""

from __future__ import annotations

import hashlib
import re

from lockbroker.server.core.errors import FieldViolation
from lockbroker.server.core.model import ReleaseMark
from lockbroker.server.core.quota import Pool

# The default of LockLimits.max_name_bytes. Names of up to 256 bytes were the limit before.
MAX_NAME_BYTES = 1024
MAX_OWNER_BYTES = 128
MAX_REQUEST_ID = 128

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SESSION_ID = re.compile(r"[0-9a-f]{16}")
_LEASE_MASK = (1 << 63) - 1

# C0 controls, DEL and C1 controls: a fixed set (Unicode category Cc), so the rule does not move
# with the Unicode version of whoever checks it. They cannot be typed, break log lines and
# terminals, and NUL cannot travel in an environment variable (`lockbroker run` passes the name).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TO_ESCAPE = re.compile(rb"[\x00-\x24]")
_ESCAPED = re.compile(rb"\$([0-9A-F]{2})")

NAME_RULE = "a name is any UTF-8 text without control characters (U+0000-U+001F, U+007F-U+009F)"


def name_problem(name: str, *, max_bytes: int = MAX_NAME_BYTES, prefix: bool = False) -> str | None:
    """Why `name` is not a valid lock name (or name prefix), or None if it is.

    Each message names the one rule broken, first broken rule first."""
    if not name:
        return None if prefix else "must not be empty"
    bad = _SURROGATE.search(name)
    if bad is not None:
        return f"is not valid UTF-8: it has a lone surrogate U+{ord(bad[0]):04X} at index {bad.start()}"
    bad = _CONTROL.search(name)
    if bad is not None:
        return f"has the control character U+{ord(bad[0]):04X} at index {bad.start()}; {NAME_RULE}"
    size = len(name.encode())
    if size > max_bytes:
        return f"is {size} bytes long in UTF-8; the limit is {max_bytes} bytes"
    return None


def key_name(name: str) -> bytes:
    """The form of lock name `name` in etcd keys (see the module docstring)."""
    raw = name.encode()
    if _TO_ESCAPE.search(raw) is None:
        return raw  # every name of the old alphabet, unchanged
    return _TO_ESCAPE.sub(lambda m: b"$%02X" % m[0][0], raw)


def name_of_key(encoded: bytes) -> str:
    """The lock name whose key form is `encoded`: the inverse of key_name()."""
    if b"$" not in encoded:
        return encoded.decode()
    return _ESCAPED.sub(lambda m: bytes((int(m[1], 16),)), encoded).decode()


def request_id_problem(request_id: str) -> str | None:
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        return "must be 1-128 characters of A-Z a-z 0-9 . _ : -"
    return None


def owner_problem(owner: str) -> str | None:
    if len(owner.encode("utf-8", "surrogatepass")) > MAX_OWNER_BYTES:
        return f"is longer than {MAX_OWNER_BYTES} bytes"
    if any(not ch.isprintable() for ch in owner):
        return "contains control or non-printable characters"
    return None


def parse_session_id(session_id: str, field: str = "session_id") -> int | FieldViolation:
    """The lease id behind a session id, or the violation that says why it is not one."""
    if not _SESSION_ID.fullmatch(session_id) or int(session_id, 16) == 0 or int(session_id, 16) > _LEASE_MASK:
        return FieldViolation(field, "must be a session id as returned by CreateSession (16 hex digits)")
    return int(session_id, 16)


def session_id_of(lease_id: int) -> str:
    return f"{lease_id:016x}"


def derived_lease_id(tenant: str, kind: str, request_id: str) -> int:
    """A lease id that a retry of the same request asks etcd for again.

    etcd refuses to grant an id twice, so a retried CreateSession or session-less Acquire finds the
    lease its first attempt made instead of making a second one: idempotency kept in etcd, not here.
    """
    digest = hashlib.sha256(f"{tenant}\0{kind}\0{request_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") & _LEASE_MASK) or 1


def prefix_end(prefix: bytes) -> bytes:
    """The etcd range_end that covers every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


class Keyspace:
    """The etcd keys of one tenant."""

    __slots__ = ("base", "locks_root", "marks_root", "quota_root", "revoked_root", "sessions_root", "tombs_root")

    def __init__(self, root: str, tenant: str) -> None:
        self.base = f"{root.rstrip('/')}/t/{tenant}/".encode()
        self.locks_root = self.base + b"l/"
        self.sessions_root = self.base + b"s/"
        self.quota_root = self.base + b"q/"
        self.marks_root = self.base + b"m/"
        self.revoked_root = self.base + b"r/"
        self.tombs_root = self.base + b"x/"

    def revocations(self, lease_id: int) -> bytes:
        """The prefix of session `lease_id`'s grant revocation markers."""
        return self.revoked_root + session_id_of(lease_id).encode() + b"/"

    def revocation(self, lease_id: int, token: int) -> bytes:
        return self.revocations(lease_id) + str(token).encode()

    def tomb(self, lease_id: int) -> bytes:
        """Where an admin's revocation of session `lease_id` is remembered after the session is gone."""
        return self.tombs_root + session_id_of(lease_id).encode()

    def session_pool(self, size: int) -> Pool:
        return Pool(self.quota_root + b"s/", size, "max_sessions")

    def entry_pool(self, size: int) -> Pool:
        return Pool(self.quota_root + b"e/", size, "max_locks")

    def lock_pool(self, name: str, size: int) -> Pool:
        return Pool(self.quota_root + b"l/" + key_name(name) + b"#", size, "max_waiters_per_lock")

    def session_key(self, lease_id: int) -> bytes:
        return self.sessions_root + session_id_of(lease_id).encode()

    def mark(self, lease_id: int) -> ReleaseMark:
        """The release marks of session `lease_id` (see LockBackend.enqueue), bound to its lease."""
        return ReleaseMark(self.marks_root + session_id_of(lease_id).encode(), lease_id)

    def lock_prefix(self, name: str) -> bytes:
        """The prefix of every entry key of lock `name`, and of no other lock's."""
        return self.locks_root + key_name(name) + b"#"

    def names_prefix(self, prefix: str) -> bytes:
        """The prefix of every entry key of every lock whose name starts with `prefix`."""
        return self.locks_root + key_name(prefix)

    def after_lock(self, name: str) -> bytes:
        """The first key past every entry of lock `name`: where List resumes after it."""
        return prefix_end(self.lock_prefix(name))

    def entry_key(self, name: str, lease_id: int, claim: str = "") -> bytes:
        """The key of one claim of session `lease_id` on lock `name`: the session's one plain
        claim (no suffix, the only key before claims existed), or ".<claim>" after the session."""
        key = self.lock_prefix(name) + session_id_of(lease_id).encode()
        return key + b"." + claim.encode() if claim else key

    def name_of(self, key: bytes) -> str:
        return name_of_key(key[len(self.locks_root) : key.rindex(b"#")])

    @staticmethod
    def lease_of(key: bytes) -> int:
        at = key.rindex(b"#") + 1
        return int(key[at : at + 16], 16)


def new_claim_id(request_id: str) -> str:
    """The claim of an Acquire with new_claim: one per request id, so a retry finds its own."""
    return "c" + request_id


def reentrant_claim_id(owner: str) -> str:
    """The claim of a reentrant owner: one per (session, owner), so re-acquiring finds it."""
    return "r" + hashlib.sha256(owner.encode()).hexdigest()[:24]


def is_reentrant_key(key: bytes) -> bool:
    at = key.rindex(b"#") + 17
    return key[at : at + 2] == b".r"

"""What a lock name, request id, owner label and session id may be, and where each lives in etcd.

Key layout, under a configurable root (default "/lockbroker/v1"):

    <root>/t/<tenant>/s/<lease hex>          a session record, bound to the session's lease
    <root>/t/<tenant>/l/<name>#<lease hex>   one queue entry of lock <name>, bound to its session's lease
    <root>/t/<tenant>/m/<lease hex>          the session's release mark: rewritten whenever the broker
                                             deletes one of the session's entries (see LockBackend.enqueue)
    <root>/t/<tenant>/r/<lease hex>/<token>  an admin's revocation of grant <token> of the session, bound
                                             to its lease: the session's keepalives report it (core.admin)
    <root>/t/<tenant>/x/<lease hex>          an admin's revocation of the whole session, on a lease of its
                                             own (REVOKED_SESSION_TTL), so Refresh can say REVOKED
    <root>/t/<tenant>/q/s/<i>                quota slot i of the tenant's sessions (see core.quota)
    <root>/t/<tenant>/q/e/<i>                quota slot i of the tenant's queue entries
    <root>/t/<tenant>/q/l/<name>#<i>         quota slot i of lock <name>'s queue

"#" never occurs in a name, so the entries of one lock are exactly the keys with prefix
"<root>/t/<tenant>/l/<name>#": lock "a" can never see the entries of lock "a/b" or "a#b".
"""

from __future__ import annotations

import hashlib
import re

from lockbroker.server.core.errors import FieldViolation
from lockbroker.server.core.model import ReleaseMark
from lockbroker.server.core.quota import Pool

MAX_NAME_BYTES = 256
MAX_OWNER_BYTES = 128
MAX_REQUEST_ID = 128

# Every allowed character sorts above "#", so key order is name order.
_NAME_SEGMENT = re.compile(r"[A-Za-z0-9\-_.:@+=,~%]+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_SESSION_ID = re.compile(r"[0-9a-f]{16}")
_LEASE_MASK = (1 << 63) - 1

NAME_RULE = (
    'at most 256 bytes of A-Z a-z 0-9 and "-_.:@+=,~%", with "/" between non-empty segments that are not "." or ".."'
)


def name_problem(name: str, *, prefix: bool = False) -> str | None:
    """Why `name` is not a valid lock name (or name prefix), or None if it is."""
    if not name:
        return None if prefix else "must not be empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    segments = name.split("/")
    if prefix and segments[-1] == "":
        segments.pop()  # "orders/" is a fine prefix
    for seg in segments:
        if seg in ("", ".", ".."):
            return f"has an empty, '.' or '..' segment; a name is {NAME_RULE}"
        if not _NAME_SEGMENT.fullmatch(seg):
            return f"has a character outside the allowed set; a name is {NAME_RULE}"
    return None


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
        return Pool(self.quota_root + b"l/" + name.encode() + b"#", size, "max_waiters_per_lock")

    def session_key(self, lease_id: int) -> bytes:
        return self.sessions_root + session_id_of(lease_id).encode()

    def mark(self, lease_id: int) -> ReleaseMark:
        """The release mark of session `lease_id` (see LockBackend.enqueue), bound to its lease."""
        return ReleaseMark(self.marks_root + session_id_of(lease_id).encode(), lease_id)

    def lock_prefix(self, name: str) -> bytes:
        return self.locks_root + name.encode() + b"#"

    def entry_key(self, name: str, lease_id: int) -> bytes:
        return self.lock_prefix(name) + session_id_of(lease_id).encode()

    def name_of(self, key: bytes) -> str:
        return key[len(self.locks_root) : key.rindex(b"#")].decode()

    @staticmethod
    def lease_of(key: bytes) -> int:
        return int(key[key.rindex(b"#") + 1 :], 16)

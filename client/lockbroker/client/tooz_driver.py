"""A tooz coordination driver over lockbroker (issue 17 item 6).

    coordinator = tooz.coordination.get_coordinator("lockbroker://127.0.0.1:50051?ttl=10", b"worker-1")
    coordinator.start()
    with coordinator.get_lock(b"reports/nightly"):
        ...

Registered as the `lockbroker` entry point of `tooz.backends` (client/pyproject.toml), so tooz finds
it once `lockbroker-client` is installed. URL options (query string):

    api_key   the tenant's API key (x-api-key)
    ttl       the coordinator's session TTL, whole seconds (default 10)
    timeout   each call's deadline, seconds (default 10)
    tls       "true": TLS with the system's roots; ca_file: TLS trusting that CA file

What maps, and how:
- start/stop: one lockbroker session per started coordinator, kept alive by the client's loop
  thread (its keepalives go on while the caller is busy); stop closes it, which releases every lock
  and leadership the coordinator still holds.
- heartbeat(): refreshes that session now; the keepalive thread does it anyway, so a coordinator
  whose owner never calls heartbeat() keeps its session too.
- get_lock(name): a lockbroker lock of the same name (so tooz and lockbroker clients exclude each
  other), FIFO, with a fencing token (`lock.fencing_token`). Each acquire is a claim of its own on
  the session (new_claim), so two Lock objects of one coordinator (or two threads sharing one Lock
  object) exclude each other as tooz wants; a lock is not reentrant.
  blocking=False is a try-lock, a number waits that long, True waits until granted.
- tooz leader election (watch_elected_as_leader + run_watchers, get_leader, stand_down_group_leader):
  ElectionService, one election "tooz/<group id>" per group; the leader's value is its member id.
  run_watchers campaigns without waiting (tooz's model: every call tries once).
- acquire(shared=True): the broker's shared (read) mode: readers share, a writer waits for the
  readers ahead of it and blocks those behind it (FIFO).
- Not supported (tooz.NotImplemented, so tooz's own tests skip them): group membership (lockbroker
  keeps no state outside sessions, so a group that outlives its members has nowhere to live), and
  Lock.break_() without an admin key (a forced release is AdminService.ForceRelease, see `break_`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import tooz
from tooz import coordination, locking, utils

from lockbroker.client.errors import (
    DeadlineExceeded,
    LockBrokerError,
    NotAcquired,
    PermissionDenied,
    Unavailable,
)
from lockbroker.client.sync import SyncClient, SyncSession
from lockbroker.client.types import Grant

LOG = logging.getLogger(__name__)

DEFAULT_TTL = 10
DEFAULT_TIMEOUT = 10.0
# A lock acquired with blocking=True waits in rounds this long (under the broker's default
# max_wait of 300 s), queueing again after each: tooz has no "forever" a single call could carry.
_ROUND = 60.0


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Broker errors as tooz's: unreachable -> ToozConnectionError, deadline -> OperationTimedOut."""
    try:
        yield
    except DeadlineExceeded as e:
        utils.raise_with_cause(coordination.OperationTimedOut, str(e), cause=e)
    except Unavailable as e:
        utils.raise_with_cause(coordination.ToozConnectionError, str(e), cause=e)
    except LockBrokerError as e:
        utils.raise_with_cause(tooz.ToozError, str(e), cause=e)


def lock_name(name: bytes | str) -> str:
    """The lockbroker name of tooz name `name`: its UTF-8 text, or "tooz-hex:<hex>" for bytes that
    are not UTF-8 or hold control characters (lockbroker names are text)."""
    if isinstance(name, str):
        return name
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return "tooz-hex:" + name.hex()
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
        return "tooz-hex:" + name.hex()
    return text


class LockbrokerLock(locking.Lock):
    """One tooz lock over a lockbroker lock of the same name, held by the coordinator's session."""

    def __init__(self, coord: LockbrokerDriver, name: bytes) -> None:
        super().__init__(name)
        self._coord = coord
        self._lb_name = lock_name(name)
        # The grants held through this object, last acquired last: shared claims stack (tooz lets
        # one Lock object take a shared lock twice and release it twice); exclusive ones never do.
        self._grants: list[Grant] = []
        self._mutex = threading.Lock()

    @property
    def fencing_token(self) -> int | None:
        """The current grant's fencing token (None while not held): pass it to what the lock protects."""
        grants = self._grants
        return grants[-1].fencing_token if grants else None

    def acquire(self, blocking: bool | float = True, shared: bool = False, timeout: int | None = None) -> bool:
        client, session = self._coord._connection()
        wait: float | None
        if blocking is False:
            wait = 0.0
        elif blocking is True:
            wait = None if timeout is None else float(timeout)
        else:
            wait = float(blocking)
        with _translated():
            while True:
                this_round = _ROUND if wait is None else wait
                try:
                    grant = client.acquire(
                        self._lb_name,
                        session_id=session.session_id,
                        wait=this_round,
                        owner=self._coord.owner,
                        request_id=uuid.uuid4().hex,
                        new_claim=True,
                        shared=shared,
                    )
                except NotAcquired:
                    if wait is None:
                        continue  # only this round ended: queue again
                    return False
                break
        with self._mutex:
            self._grants.append(grant)
            self._coord._held.add(self)
        return True

    def release(self) -> bool:
        with self._mutex:
            grant = self._grants.pop() if self._grants else None
            if not self._grants:
                self._coord._held.discard(self)
        if grant is None:
            return False
        client, _ = self._coord._connection()
        with _translated():
            return client.release(grant.name, grant.fencing_token, session_id=grant.session_id)

    def is_still_owner(self) -> bool:
        if not self._grants:
            return False
        grant = self._grants[-1]
        client, _ = self._coord._connection()
        with _translated():
            return client.check_fence(grant.name, grant.fencing_token).current

    def break_(self) -> bool:
        """Force the lock free (AdminService.ForceRelease): needs an API key with the admin role."""
        client, _ = self._coord._connection()
        try:
            with _translated():
                try:
                    gone = client._call(client.aio.admin.force_release(self._lb_name, reason="tooz Lock.break_()"))
                except PermissionDenied as e:
                    raise tooz.NotImplemented(
                        "break_() is an admin's ForceRelease: give the coordinator an API key with the admin role"
                    ) from e
        except grpc.RpcError as e:  # pragma: no cover - the client turns every RPC error into ours
            utils.raise_with_cause(tooz.ToozError, str(e), cause=e)
        return bool(gone.released)

    def heartbeat(self) -> bool:
        """Whether the lock is held; the session's keepalive keeps it (see LockbrokerDriver.heartbeat)."""
        return bool(self._grants)


class LockbrokerDriver(coordination.CoordinationDriver):
    """tooz driver `lockbroker://host:port?api_key=...&ttl=...` (see the module docstring)."""

    CHARACTERISTICS = (
        coordination.Characteristics.DISTRIBUTED_ACROSS_THREADS,
        coordination.Characteristics.DISTRIBUTED_ACROSS_PROCESSES,
        coordination.Characteristics.DISTRIBUTED_ACROSS_HOSTS,
        # Every grant is an etcd transaction through the broker.
        coordination.Characteristics.LINEARIZABLE,
        coordination.Characteristics.SERIALIZABLE,
    )

    def __init__(self, member_id: bytes, parsed_url: Any, options: dict[str, Any]) -> None:
        super().__init__(member_id, parsed_url, options)
        opts = utils.collapse(options)
        host = parsed_url.hostname or "127.0.0.1"
        self.target = f"[{host}]:{parsed_url.port or 50051}" if ":" in host else f"{host}:{parsed_url.port or 50051}"
        self.api_key: str | None = opts.get("api_key")
        self.ttl = int(opts.get("ttl", DEFAULT_TTL))
        self.timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
        self._tls = str(opts.get("tls", "")).lower() in ("1", "true", "yes")
        self._ca_file: str | None = opts.get("ca_file")
        self.owner = lock_name(member_id)
        self._client: SyncClient | None = None
        self._session: SyncSession | None = None
        self._held: set[LockbrokerLock] = set()
        self._leading: dict[bytes, Grant] = {}

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self._ca_file:
            with open(self._ca_file, "rb") as f:
                return grpc.ssl_channel_credentials(f.read())
        return grpc.ssl_channel_credentials() if self._tls else None

    def _connection(self) -> tuple[SyncClient, SyncSession]:
        if self._client is None or self._session is None:
            raise tooz.ToozError("the coordinator is not started")
        return self._client, self._session

    def _start(self) -> None:
        with _translated():
            client = SyncClient(
                self.target, credentials=self._credentials(), api_key=self.api_key, default_timeout=self.timeout
            )
            try:
                # The session's keeper is started and closed explicitly, not through the
                # SyncClient.session() generator: a coordinator dropped without stop() would have
                # that generator closed by the garbage collector, which must not make blocking calls.
                session = client._call(self._open_session(client))
            except BaseException:
                client.close()
                raise
        self._client, self._session = client, session

    async def _open_session(self, client: SyncClient) -> SyncSession:
        keeper = client.aio.session(self.ttl, self.owner)
        await keeper.start()
        return SyncSession(keeper)

    def _stop(self) -> None:
        client, session = self._client, self._session
        self._client = self._session = None
        self._held.clear()
        self._leading.clear()
        if client is None:
            return
        try:
            if session is not None:
                with _translated():
                    # Closing the session releases its locks and leaderships in the same step.
                    client._call(session._keeper.__aexit__(None, None, None))
        finally:
            client.close()

    def heartbeat(self) -> float:
        """Refresh the session now; the next beat is due in a third of its TTL."""
        client, session = self._connection()
        with _translated():
            client.refresh(session.session_id)
        return max(1.0, self.ttl / 3)

    def get_lock(self, name: bytes) -> LockbrokerLock:
        return LockbrokerLock(self, name)

    # -- leader election (ElectionService) -------------------------------------------------

    @staticmethod
    def _election(group_id: bytes) -> str:
        return "tooz/" + lock_name(group_id)

    def run_watchers(self, timeout: float | None = None) -> list[Any]:
        """Campaign once, without waiting, in each group with elected-as-leader hooks; run the hooks
        of the groups won. (Join and leave watches need groups, which this driver does not have.)"""
        results: list[Any] = []
        for group_id in list(self._hooks_elected_leader):
            if group_id in self._leading:
                continue
            if self._campaign(group_id):
                results.extend(
                    self._hooks_elected_leader[group_id].run(coordination.LeaderElected(group_id, self._member_id))
                )
        return results

    def run_elect_coordinator(self) -> None:
        self.run_watchers()

    def _campaign(self, group_id: bytes) -> bool:
        client, session = self._connection()
        election = client.aio.election(self._election(group_id))
        try:
            with _translated():
                grant = client._call(
                    election.campaign_once(self._member_id, session_id=session.session_id, wait=0, owner=self.owner)
                )
        except tooz.ToozError as e:
            if isinstance(e.__cause__, NotAcquired):
                return False  # another member leads
            raise
        self._leading[group_id] = grant
        return True

    def get_leader(self, group_id: bytes) -> coordination.CoordAsyncResult[bytes]:
        client, _ = self._connection()
        with _translated():
            leader = client.election(self._election(group_id)).leader()
        return _Done(leader.value if leader is not None else None)

    def stand_down_group_leader(self, group_id: bytes) -> bool:
        grant = self._leading.pop(group_id, None)
        if grant is None:
            return False
        client, _ = self._connection()
        with _translated():
            return client._call(
                client.aio.election(self._election(group_id)).resign(grant.session_id, grant.fencing_token)
            )

    def watch_join_group(self, group_id: bytes, callback: Any) -> None:
        raise tooz.NotImplemented("group membership is not supported by the lockbroker driver")

    watch_leave_group = watch_join_group


class _Done(coordination.CoordAsyncResult[Any]):
    """A result computed at once (tooz's API hands back results to `get()`)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def get(self, timeout: float | None = None) -> Any:
        return self._value

    def done(self) -> bool:
        return True


__all__ = ["LockbrokerDriver", "LockbrokerLock", "lock_name"]

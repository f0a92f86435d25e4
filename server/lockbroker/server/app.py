"""Assemble and run a broker: etcd (embedded or remote), the lock core, the gRPC server.

Interceptors are composed here and only here; health and reflection are registered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
from collections.abc import Callable

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.utils import suppress_instrumentation

from lockbroker.interceptors.audit import AuditInterceptor, AuditLog, audit_log
from lockbroker.interceptors.base import chain as interceptor_chain
from lockbroker.interceptors.identity import IdentityInterceptor
from lockbroker.interceptors.metrics import GrpcMetricsInterceptor, LockMetricsInterceptor
from lockbroker.interceptors.quota import PeerLimitInterceptor, Rate, RateLimitInterceptor
from lockbroker.interceptors.tracing import LockSpanInterceptor
from lockbroker.server import auth, lifecycle, logs, loops
from lockbroker.server.admin_service import ADMIN_SERVICE, AdminService, revocation_auditor
from lockbroker.server.auth import tenants
from lockbroker.server.auth.tenants import TenantRegistry, TenantsFileError
from lockbroker.server.config import Config, ConfigError, LockLimits
from lockbroker.server.core.election import ElectionCore
from lockbroker.server.core.errors import Unavailable
from lockbroker.server.core.locks import LockCore
from lockbroker.server.core.memory import MemoryLockBackend
from lockbroker.server.core.quota import Quotas, TenantQuota
from lockbroker.server.election_service import ELECTION_SERVICE, ElectionService
from lockbroker.server.embedded import EmbeddedEtcd, EmbeddedEtcdConfig
from lockbroker.server.etcd.backend import EtcdLockBackend
from lockbroker.server.etcd.client import EtcdClient
from lockbroker.server.metrics import Metrics
from lockbroker.server.service import LockService, RetryPolicy, add_to_server
from lockbroker.server.statedir import StateDirLock
from lockbroker.server.telemetry import DISABLED, Tracing, TracingConfigError, configure_tracing
from lockbroker.v1 import lock_pb2

log = logging.getLogger("lockbroker.server")

SERVICE_NAME = lock_pb2.DESCRIPTOR.services_by_name["LockService"].full_name
ADMIN_SERVICE_NAME = ADMIN_SERVICE.full_name
ELECTION_SERVICE_NAME = ELECTION_SERVICE.full_name
# Kubernetes: livenessProbe on LIVENESS (SERVING while the process can serve: a restart would not
# help while etcd is down), readinessProbe on READINESS (SERVING only while etcd answers). "" and
# the LockService name follow readiness, as before.
LIVENESS = "lockbroker.liveness"
READINESS = "lockbroker.readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SERVER_OPTIONS: list[tuple[str, int]] = [
    # Blocking Acquire calls can sit idle for minutes: let clients ping to keep NATs and LBs open
    # without being told "too_many_pings".
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 1024 * 1024),  # no request of ours comes near this
    ("grpc.max_metadata_size", 16 * 1024),
    # grpc sets SO_REUSEPORT by default: a second broker on the same address would start and
    # silently take half the connections. Fail to bind instead. Only the workers of one
    # `serve --workers N` share a port (server_options), behind their parent's guard (workers.py).
    ("grpc.so_reuseport", 0),
    # BDP probing keeps growing a stream's HTTP/2 receive window, so a client that writes KeepAlive
    # requests and never reads the answers could make the broker buffer megabytes per stream. Our
    # messages are tiny; the default window is plenty.
    ("grpc.http2.bdp_probe", 0),
    # Calls that arrived but that the asyncio loop has not picked up yet wait in grpc's backlog,
    # which by default starts cancelling new calls at random past 1,000 and all past 3,000. A burst
    # of blocking Acquires (10,000 workers starting at once) then got a bare CANCELLED, which no
    # client retries. Let them queue instead: the quota's max_waiters bounds how many can wait.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # A call the loop has not picked up within this time is cancelled, again with a bare CANCELLED
    # (grpc's default is 30 s). On a loaded machine a burst of 3,500 calls took longer than that to
    # drain. Each call's own deadline still bounds its wait; this only stops grpc from giving up
    # on calls that have none, or a longer one.
    ("grpc.server_max_unrequested_time_in_server", 600),
]


def server_options(shared_port: bool = False) -> list[tuple[str, int]]:
    """SERVER_OPTIONS; with `shared_port`, SO_REUSEPORT on, for the workers of one broker."""
    if not shared_port:
        return SERVER_OPTIONS
    return [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]


is_loopback = auth.is_loopback  # tests/test_config.py imports it from here

# File descriptors kept for what is not a client connection: etcd connections, the audit file,
# the metrics and health listeners, the embedded etcd's pipes, logging.
FD_RESERVE = 256


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit, and return the soft limit now in force.

    Distributions start processes at a soft limit of 1,024: 1,100 silent connections then made
    accept() fail and every client time out. The hard limit is the operator's ceiling; the soft
    one is only a default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)  # Linux refuses an infinite NOFILE: take a large finite one
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            log.info("raised the open-files limit", extra={"from": soft, "to": hard})
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit", extra={"soft": soft, "hard": hard, "error": str(e)})
    return soft


def connection_options(limits: LockLimits, open_files: int) -> list[tuple[str, int]]:
    """The gRPC server options that bound client connections (issue 18, item 12).

    grpc has no per-server connection count of its own in Python's API, but its core does:
    `grpc.max_allowed_incoming_connections` closes a connection as it arrives once that many are
    open, so connections can never take the descriptors etcd and the audit log need. A connection
    that never completes its handshake is closed after `handshake_timeout` (grpc's default: 120 s),
    and one with no call for `connection_idle` gets a GOAWAY (clients reconnect when they next
    call). KeepAlive streams and waiting Acquires are calls: they keep their connection."""
    cap = limits.max_connections or max(64, open_files - FD_RESERVE)
    return [
        ("grpc.max_allowed_incoming_connections", min(cap, 2**31 - 1)),
        ("grpc.server_handshake_timeout_ms", max(1, int(limits.handshake_timeout * 1000))),
        ("grpc.max_connection_idle_ms", max(1, int(limits.connection_idle * 1000))),
    ]


class Broker:
    def __init__(self, config: Config, *, tracing: Tracing | None = None, shared_port: bool = False) -> None:
        """`tracing`: use this instead of what the OTEL_* environment asks for (tests).

        `shared_port`: this is one of the `config.server.workers` processes of `serve --workers N`
        (workers.py): the ports are shared with SO_REUSEPORT, the acquire rate is split among the
        workers, and metrics are recorded for the parent to serve (prometheus multiprocess mode)."""
        self.config = config
        self.shared_port = shared_port
        self._own_tracing = tracing is None
        self.tracing = tracing or DISABLED
        self.audit_log: AuditLog | None = None
        self.audit: AuditInterceptor | None = None
        self.embedded: EmbeddedEtcd | None = None
        self.client: EtcdClient | None = None
        self.backend: EtcdLockBackend | MemoryLockBackend | None = None
        self.core: LockCore | None = None
        self.service: LockService | None = None
        self.admin_service: AdminService | None = None
        self.election_service: ElectionService | None = None
        self.health = health_aio.HealthServicer()
        self.server: aio.Server | None = None
        self.port = 0
        self.identity: IdentityInterceptor | None = None
        self.registry: TenantRegistry | None = None
        self.quotas = Quotas(config.quota)
        self._monitor: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self.metrics = Metrics() if config.server.metrics_listen else None
        self._state_lock: StateDirLock | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self.health_server: aio.Server | None = None
        self.health_port = 0
        # Set by run_until_signal: how a fatal error (etcd gone for good) ends the run.
        self.on_fatal: Callable[[BaseException], None] | None = None

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return self.client_config.endpoints

    async def start(self) -> None:
        cfg = self.config
        security = auth.security(cfg)
        self.registry, self.identity, credentials = security.registry, security.identity, security.credentials
        self.quotas = self._quotas()
        if self._own_tracing:
            try:
                self.tracing = configure_tracing(os.environ)
            except TracingConfigError as e:
                raise ConfigError(str(e)) from None
        if cfg.audit.enabled:
            self.audit_log = audit_log(
                stdout=cfg.audit.stdout,
                path=cfg.audit.file,
                fsync=cfg.audit.fsync,  # type: ignore[arg-type]  # validated by AuditConfig
                fsync_interval=cfg.audit.fsync_interval,
            )
            if not await self.audit_log.ready():
                raise ConfigError(f"the audit log cannot be written ({cfg.audit.file or 'stdout'})")
            self.audit = AuditInterceptor(self.audit_log, fail_open=cfg.audit.fail_open)
        self.backend = await self._open_backend()
        etcd_cfg = self.client_config
        self.core = LockCore(self.backend, etcd_cfg.key_root, self.quotas)
        self.core.holds.on_revoked = revocation_auditor(self.audit_log)
        # Background work (the max-hold sweep) is not traced: its task copies this context, so a
        # read every quarter second does not make a root trace of its own (as the health probe).
        with suppress_instrumentation():
            self.core.start()
        self.service = LockService(
            self.core, cfg.limits, RetryPolicy(max_attempts=cfg.retry.max_attempts), quotas=self.quotas
        )

        self.server = self._services(self.service)
        try:
            if credentials is not None:
                self.port = self.server.add_secure_port(cfg.server.listen, credentials)
            else:
                self.port = self.server.add_insecure_port(cfg.server.listen)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {cfg.server.listen}: {e}") from None
        if self.metrics is not None and cfg.server.metrics_listen and not self.shared_port:
            if self.client is not None:  # the state gauges read etcd; the memory backend has none
                self.metrics.watch_state(self.client, etcd_cfg.key_root)
            try:
                self.metrics.serve(cfg.server.metrics_listen)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot serve metrics on {cfg.server.metrics_listen}: {e}") from None
            log.info("metrics on /metrics", extra={"metrics_listen": cfg.server.metrics_listen})
        await self.health.set(LIVENESS, SERVING)
        if cfg.server.health_listen:
            self.health_server = self._health_only_server(cfg.server.health_listen)
        await self._probe()  # health is right from the first check
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        self._monitor = asyncio.create_task(self._watch_health())
        if self.embedded is not None:
            supervisor = lifecycle.EtcdSupervisor(self.embedded, self._probe, self._fatal)
            self._supervisor = asyncio.create_task(supervisor.run())
        log.info(
            "lockbroker serving",
            extra={
                "listen": cfg.server.listen,
                "port": self.port,
                "etcd": ",".join(etcd_cfg.endpoints),
                "event_loop": loops.name(asyncio.get_running_loop()),
            },
        )

    def _services(self, service: LockService) -> aio.Server:
        """The gRPC server with every service registered, behind the one interceptor chain."""
        assert self.core is not None
        cfg = self.config
        options = [*server_options(self.shared_port), *connection_options(cfg.limits, raise_open_files_limit())]
        server = aio.server(interceptors=self._interceptors(), options=options)
        add_to_server(service, server)
        self.admin_service = AdminService(self.core, service.retry, self.audit_log)
        add_to_server(self.admin_service, server, ADMIN_SERVICE)
        assert self.backend is not None
        core = self.core
        elections = ElectionCore(
            self.backend,
            self.client_config.key_root,
            quotas=self.quotas,
            leases=core.leases,
            owners=core.owners,
            closing=lambda: core.closing,
        )
        self.election_service = ElectionService(
            elections, cfg.limits, locks=service, etcd=self.client, retry=service.retry, quotas=self.quotas
        )
        add_to_server(self.election_service, server, ELECTION_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            [SERVICE_NAME, ADMIN_SERVICE_NAME, ELECTION_SERVICE_NAME, health_name, reflection.SERVICE_NAME], server
        )
        return server

    def _health_only_server(self, listen: str) -> aio.Server:
        """Plaintext gRPC health on its own port, for kubelet probes when the main listener is TLS
        (and perhaps mTLS) only. It serves nothing but grpc.health.v1.Health."""
        server = aio.server(options=[("grpc.so_reuseport", int(self.shared_port))])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            self.health_port = server.add_insecure_port(listen)
        except RuntimeError as e:
            raise ConfigError(f"--health-listen: cannot listen on {listen}: {e}") from None
        return server

    async def _open_backend(self) -> EtcdLockBackend | MemoryLockBackend:
        """Where locks live: etcd (an embedded one when no endpoints are configured), or memory."""
        cfg = self.config
        etcd_cfg = cfg.etcd
        self.client_config = etcd_cfg
        if cfg.server.backend == "memory":
            log.warning(
                "--backend memory: locks, sessions and fencing tokens live in this process only. Nothing is "
                "durable (a restart forgets every lock and starts tokens over), and several replicas would "
                "each grant the same lock. For development and tests only; never run it behind a load balancer."
            )
            return MemoryLockBackend()
        if not etcd_cfg.endpoints:
            state = cfg.embedded.resolved_state_dir()
            self._state_lock = StateDirLock(state)
            self._state_lock.acquire()  # before etcd touches the data dir
            self.embedded = EmbeddedEtcd(EmbeddedEtcdConfig(data_dir=state / "etcd", binary=cfg.embedded.binary))
            await self.embedded.start()
            etcd_cfg = dataclasses.replace(etcd_cfg, endpoints=(self.embedded.endpoint,))
            log.info("started embedded etcd", extra={"endpoint": self.embedded.endpoint, "data_dir": str(state)})
        self.client_config = etcd_cfg
        # The broker's own etcd calls join the caller's trace: client -> broker -> each etcd call.
        self.client = EtcdClient(
            etcd_cfg, tracer=self.tracing.backend_tracer, observer=self.metrics.etcd.observe if self.metrics else None
        )
        return EtcdLockBackend(self.client, batching=etcd_cfg.group_commit)

    def _quotas(self) -> Quotas:
        """The default quota, and each tenant's own from the tenants file (checked here: a typo
        in a limit's name must stop the broker, not silently leave a tenant unlimited)."""
        registry = self.registry if self.identity is not None else None
        return Quotas(self.config.quota, self._overrides(registry, self.config.auth.tenants_file))

    def _overrides(self, registry: tenants.TenantRegistry | None, path: str | None) -> dict[str, TenantQuota]:
        overrides = {}
        for tenant in registry if registry is not None else ():
            if tenant.quota:
                try:
                    overrides[tenant.name] = self.config.quota.with_overrides(
                        dict(tenant.quota), f"{path}: [tenants.{tenant.name}] quota"
                    )
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        return overrides

    def _rate(self, tenant: str, bucket: str = "acquire") -> Rate:
        q = self.quotas(tenant)
        return Rate(getattr(q, f"{bucket}_rate"), getattr(q, f"{bucket}_burst"))

    def _shares(self) -> int:
        """How many processes split each per-replica rate: the workers of `serve --workers N`."""
        return self.config.server.workers if self.shared_port else 1

    def _interceptors(self) -> list[aio.ServerInterceptor]:
        """The chain, outermost first; every layer shares one `CallState` per call.

        tracing   OTel's server span, so every other layer (and each etcd call) is inside it;
        audit     one record per call, written from the call's state when it ends (principal,
                  attempts, outcome); refuses mutating calls early when its sink is failing;
        identity  writes the caller's principal (hence the tenant) on the state, or UNAUTHENTICATED;
        lock span lock attributes on the server span, from the request, the response and the state;
        peer      calls failing authentication, per peer address (only with authentication on);
        quota     the tenant's acquire, read and session rates (per replica); limits on held state
                  are the core's;
        request   audit's request stage: a mutating call's RequestReceived record, queued as the
                  handler starts; audit's `after` answers once it is durable (docs/audit.md);
        service   the edge: deadline, retry of transient backend failures (one call, N attempts,
                  so identity and quota are charged once), and the one mapping of errors to statuses;
        core      the lock semantics; backend: etcd transactions.

        For unary calls the four lockbroker layers run in one frame (`interceptors.base.layered`):
        their `before` hooks in this order, then the handler, then `after` (or, on any failure,
        every layer's `failed`, which is how audit records a rejection by identity or quota).
        Streams (KeepAlive) nest the same layers in this order, which is why audit sits before
        identity: only a layer outside another sees its rejection in a nested chain.
        """
        chain: list[aio.ServerInterceptor] = [*self.tracing.server_interceptors()]
        if self.metrics is not None:  # outermost of ours: every call counted, rejections too
            chain.append(GrpcMetricsInterceptor(self.metrics.grpc))
        if self.audit is not None:
            chain.append(self.audit)
        if self.identity is not None:
            limits = self.config.limits
            # Before identity: a peer that keeps failing authentication is refused before its
            # credentials are checked again.
            shares = self._shares()  # the workers of one broker split its per-peer rate, as its tenants' rates
            peer_rate = Rate(limits.unauthenticated_rate / shares, max(1, limits.unauthenticated_burst // shares))
            chain.append(PeerLimitInterceptor(peer_rate))
            chain.append(self.identity)
        if self.metrics is not None:  # needs the tenant; before quota, so rate refusals count
            chain.append(LockMetricsInterceptor(self.metrics.locks))
        if self.tracing.provider is not None:
            chain.append(LockSpanInterceptor())
            if self.service is not None:
                # The Session stream's messages get a server span each, which the OTel interceptor
                # (one span per gRPC call) cannot make; the service makes them with this tracer.
                self.service.sessions.tracer = self.tracing.provider.get_tracer("lockbroker.server.session_stream")
        if self.quotas.any(lambda q: q.acquire_rate > 0 or q.read_rate > 0 or q.session_rate > 0):
            chain.append(RateLimitInterceptor(self._rate, shares=self._shares()))
        if self.audit is not None:  # last: the RequestReceived record, fsynced while the handler works
            chain.append(self.audit.request_stage)
        return interceptor_chain(chain)

    async def _probe(self) -> None:
        assert self.backend is not None
        try:
            # Not traced: a root trace per probe (every second) would bury the traces of calls.
            with suppress_instrumentation():
                await self.backend.ping(
                    self.client_config.key_root.encode(),
                    timeout=max(0.5, min(2.0, 2 * self.config.server.health_interval)),
                )
            ok = True
        except Unavailable as e:
            ok = False
            if self._serving is not False:
                log.warning("etcd unreachable; health NOT_SERVING", extra={"error": str(e)})
        except Exception:
            ok = False
            log.exception("health probe failed")
        if ok != self._serving:
            if ok and self._serving is False:
                log.info("etcd reachable again; health SERVING")
            self._serving = ok
            for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME, ELECTION_SERVICE_NAME, READINESS):
                await self.health.set(name, SERVING if ok else NOT_SERVING)

    def _fatal(self, err: BaseException) -> None:
        if self.on_fatal is not None:
            self.on_fatal(err)
        else:
            log.critical("nothing to end: the broker goes on serving NOT_SERVING", extra={"error": str(err)})

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.health_interval)
            await self._probe()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, end waiters cleanly (their entries removed), stop.

        The embedded etcd is stopped last: the drain needs it to remove the waiters' queue entries."""
        grace = self.config.server.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.draining = True
        if self.admin_service is not None:
            self.admin_service.draining = True
        if self.election_service is not None:
            self.election_service.draining = True
        if self.core is not None:
            self.core.begin_shutdown()
        for task in (self._monitor, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.core is not None:
            await self.core.drain_cleanups(timeout=max(1.0, grace))
        if self.election_service is not None:
            await self.election_service.core.drain(timeout=max(1.0, grace))
        if self.audit_log is not None:
            await self.audit_log.close()
        if self.backend is not None:
            await self.backend.close()
        if self.client is not None:
            await self.client.close()
        if self._own_tracing:
            self.tracing.shutdown()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        if self.embedded is not None:
            await self.embedded.stop()
        if self._state_lock is not None:
            self._state_lock.release()

    async def reload(self, new: Config) -> None:
        """SIGHUP: take the log level and the tenants file (keys, identities, per-tenant quotas) from
        `new`; nothing else changes, and no call is dropped. A bad tenants file keeps the old one."""
        changed: dict[str, object] = {}
        if new.server.log_level != logging.getLevelName(logging.getLogger().level).lower():
            logs.set_level(new.server.log_level)
            changed["log_level"] = new.server.log_level
        path = new.auth.tenants_file
        if (self.identity is None) != (path is None):
            log.error(
                "reload: turning authentication on or off needs a restart; tenants file not reloaded",
                extra={"tenants_file": path},
            )
        elif self.identity is not None and path is not None:
            try:
                registry = tenants.load(path)
                overrides = self._overrides(registry, path)
            except (TenantsFileError, ConfigError) as e:
                log.error("reload: keeping the previous tenants file", extra={"error": str(e)})
            else:
                if len(registry) == 0:
                    log.error("reload: the tenants file lists no tenants; keeping the previous one")
                else:
                    self.identity.registry = self.registry = registry
                    # In place: the lock core and the rate limiter hold this object.
                    Quotas.__init__(self.quotas, self.config.quota, overrides)
                    changed["tenants_file"] = path
                    changed["tenants"] = len(registry)
        log.info("reloaded on SIGHUP", extra={"reloaded": sorted(changed), **changed})

    async def run_until_signal(self, reload: Callable[[], Config] | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain; see lifecycle.run_until_signal."""
        await lifecycle.run_until_signal(self, reload)

"""The one place where the server process is assembled and torn down.

Objects are built in dependency order, each handed what it needs (no setters closing the graph):
data dir -> store -> keys and CA (on PostgreSQL the cluster's, from the database) -> HTTP sockets (so
fileUrls know the port) -> outbox and cluster -> job engine -> device reports -> device gateway ->
broker -> services -> HTTP sites; the cluster (leadership) and the job engine start last.
Stop runs in reverse and is idempotent.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import logging
import os
import resource
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from otabox import __version__
from otabox.errors import StorageUnavailable
from otabox.server import backup, pki
from otabox.server.accounts import AccountService
from otabox.server.artifacts import Artifacts, DatabaseCopy, SharedCopy
from otabox.server.bundles import BundleService
from otabox.server.cluster import PostgresCluster, Solo, share_keys
from otabox.server.deltas import DeltaService
from otabox.server.firmware import FirmwareService
from otabox.server.http.app import build_app
from otabox.server.jobs.engine import JobEngine
from otabox.server.jobs.reports import DeviceReports
from otabox.server.jobs.service import JobService
from otabox.server.keys import FileUrls, Keys, Signer, hash_token, new_token, write_private
from otabox.server.metrics import LoopLag, Metrics
from otabox.server.mqtt.broker import OtaBroker
from otabox.server.mqtt.device_hooks import DeviceGateway
from otabox.server.mqtt.outbox import Outbox
from otabox.server.nodes import NodeService, default_node_id
from otabox.server.registry import Registry
from otabox.server.s3 import Bucket, BucketUrl, StorageConfigError
from otabox.server.services import Services, Status
from otabox.server.settings import Settings
from otabox.server.store import Store
from otabox.server.throttle import LoginLimiter
from otabox.server.webhooks import WebhookService

log = logging.getLogger(__name__)

ADMIN_TOKEN_KEY = "admin_token_sha256"
LOCK_FILE = "otabox.lock"
# Allocations (net) between young-generation collections; CPython's default is 700.
GC_GEN0_THRESHOLD = 50_000
# Seconds between full collections (see collect_periodically).
GC_FULL_EVERY = 300.0
# Pending HTTP connections the kernel queues (a fleet's downloads can arrive at once).
HTTP_BACKLOG = 1024
# Open files a server needs besides its devices' sockets (database, firmware, HTTP clients, logs).
SPARE_FILES = 100


class App:
    """One otabox server: store, broker, HTTP site and job engine in one event loop."""

    def __init__(self, settings: Settings, *, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = dict(os.environ) if env is None else env
        self.version = __version__
        self.data_dir = Path(settings.data_dir).resolve()
        self.printed_token: str | None = None
        self.services: Services | None = None
        self.store: Store | None = None
        self.broker: OtaBroker | None = None
        self.engine: JobEngine | None = None
        self.deltas: DeltaService | None = None
        self._lag: LoopLag | None = None
        self.webhooks: WebhookService | None = None
        self.gateway: DeviceGateway | None = None
        self.nodes: NodeService | None = None
        self.cluster: PostgresCluster | Solo | None = None
        self._runner: web.AppRunner | None = None
        self._http_socks: list[socket.socket] = []
        self._lock: int | None = None
        self._backups: asyncio.Task[None] | None = None
        self._backups_stop = asyncio.Event()
        self._stopped = False

    @property
    def http_port(self) -> int | None:
        return self.services.status.http_port if self.services else None

    @property
    def mqtt_port(self) -> int | None:
        return self.services.status.mqtt_port if self.services else None

    @property
    def public_url(self) -> str:
        return self.services.urls.public_url if self.services else ""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every component; on failure, stop what was started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._lock = lock_data_dir(self.data_dir)
        node_id = s.node_id or default_node_id(s.mqtt_port if s.listens("mqtt_port") else s.mqtts_port)
        store = self.store = await Store.open(s.database_url or self.data_dir / "otabox.db", node_id=node_id)
        clustered = store.dialect != "sqlite"
        if clustered:
            await share_keys(store, self.data_dir)
        keys = Keys.load_or_create(self.data_dir)
        ca = pki.CertificateAuthority.load_or_create(self.data_dir)
        tls_mqtt, tls_https, tls_hosts = self._tls(ca)
        signer = Signer.load_or_create(Path(s.signing_key).expanduser()) if s.signing_key else None
        admin_hash = await self._admin_token(store)
        bucket = Bucket(BucketUrl.parse(s.storage_url, self.env), self.env) if s.storage_url else None
        shared: SharedCopy | None = bucket or (DatabaseCopy(store) if clustered else None)
        if bucket is not None:
            await bucket.check()  # wrong keys or no bucket: refuse to start, not fail each upload
        artifacts = Artifacts(self.data_dir / "firmware", shared=shared)
        swept = artifacts.sweep(await store.stored_digests())
        if swept:
            log.warning("removed %d firmware file(s) no record refers to (left by a crash)", len(swept))
        if shared is not None:
            # Files kept only in this data dir (an install moved by `otabox db copy` with its data
            # dir, or one started with --storage-url for the first time): into the shared copy now.
            digests = [sha for sha in await store.stored_digests() if artifacts.path_for(sha).exists()]
            for sha in digests:
                await artifacts.share(sha)
            log.info("firmware in %s (%d file(s) of this data dir checked there)", shared.where, len(digests))

        http_sock = self._listen(s.http_port) if s.listens("http_port") else None
        https_sock = self._listen(s.https_port) if tls_https is not None and s.listens("https_port") else None
        http_port = _bound(http_sock)
        https_port = _bound(https_sock)
        if s.public_url:
            public_url = s.public_url
        elif http_port is not None:
            public_url = _default_public_url("http", s.host, http_port)
        else:
            assert https_port is not None  # settings refuse a server with no HTTP listener at all
            # The name devices check the certificate against, not a bind address.
            public_url = _default_public_url("https", tls_hosts[0] if tls_hosts else s.host, https_port)
        urls = FileUrls(
            keys, public_url, s.download_token_ttl, bucket.presign if bucket and s.storage_presign else None
        )

        outbox = Outbox()
        cluster: PostgresCluster | Solo = Solo(outbox)
        if clustered:
            cluster = PostgresCluster(store, s.database_url, node_id, outbox, s.node_timeout)
        self.cluster = cluster
        # Before any device can connect: this node's devices of an earlier run are offline.
        nodes = self.nodes = NodeService(store, outbox, s.node_heartbeat, s.node_timeout)
        await nodes.start()
        deltas = self.deltas = DeltaService(store, artifacts, s.delta_max_bytes, s.delta_timeout, s.delta_algorithm)
        engine = self.engine = JobEngine(store, cluster, urls, s.scheduler_interval, deltas)
        reports = DeviceReports(engine, store)
        limiter = LoginLimiter(s.login_fail_limit, s.login_fail_window)
        gateway = self.gateway = DeviceGateway(store, keys, limiter, reports, outbox, s.last_seen_interval)
        nodes.presence = gateway
        self.broker = OtaBroker(
            gateway,
            outbox,
            s.host,
            s.mqtt_port if s.listens("mqtt_port") else None,
            s.connect_timeout,
            s.mqtt_max_packet_bytes,
            s.mqtt_max_connections,
            tls=tls_mqtt,
            tls_port=s.mqtts_port if tls_mqtt is not None and s.listens("mqtts_port") else None,
        )
        await self.broker.start()

        status = Status(self.version, http_port, self.broker.port, https_port, self.broker.tls_port)
        webhooks = self.webhooks = WebhookService(
            store, keys, timeout=s.webhook_timeout, leading=lambda: cluster.leader
        )
        accounts = AccountService(store, admin_hash)
        await accounts.ensure_builtin_admin()
        lag = self._lag = LoopLag()
        lag.start()
        firmware = FirmwareService(store, artifacts, signer, s.max_upload_bytes, deltas)
        services = self.services = Services(
            settings=s,
            status=status,
            store=store,
            keys=keys,
            signer=signer,
            artifacts=artifacts,
            urls=urls,
            outbox=outbox,
            registry=Registry(store, keys, reports, cluster.sessions_for(gateway), ca),
            firmware=firmware,
            bundles=BundleService(store, artifacts, firmware),
            jobs=JobService(store, engine),
            engine=engine,
            deltas=deltas,
            metrics=Metrics(store, outbox, self.broker, lag),
            webhooks=webhooks,
            accounts=accounts,
            nodes=nodes,
            admin_token_hash=admin_hash,
        )
        self._runner = web.AppRunner(build_app(services), access_log=None, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        if http_sock is not None:
            await web.SockSite(self._runner, http_sock).start()
        if https_sock is not None:
            await web.SockSite(self._runner, https_sock, ssl_context=tls_https).start()

        await cluster.start(engine)
        await engine.start()
        await webhooks.start()
        if s.backup_every > 0:
            self._backups = asyncio.create_task(self._scheduled_backups(), name="otabox-backups")
        write_private(self.data_dir / "ports.json", json.dumps(status.ports()).encode())
        status.ready.set()
        log.info(
            "otabox %s ready: fileUrls %s, listening on %s, data in %s",
            self.version,
            urls.public_url,
            ", ".join(f"{name} {port}" for name, port in status.ports().items()),
            self.data_dir,
        )

    def _listen(self, port: int) -> socket.socket:
        sock = socket.create_server(
            (self.settings.host, port), family=_family(self.settings.host), backlog=HTTP_BACKLOG, reuse_port=False
        )
        self._http_socks.append(sock)
        return sock

    def _tls(self, ca: pki.CertificateAuthority) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None, list[str]]:
        """(MQTT context, HTTPS context, --tls-self-signed hosts) when TLS is on. Raises OSError."""
        s = self.settings
        if not s.tls:
            return None, None, []
        hosts = pki.parse_hosts(s.tls_self_signed) if s.tls_self_signed else []
        if hosts:
            cert, key = ca.server_files(hosts)
        else:
            cert, key = Path(s.tls_cert).expanduser(), Path(s.tls_key).expanduser()
        try:
            # Devices may present a certificate of otabox's CA; browsers are asked for none.
            return pki.server_context(cert, key, client_ca=ca.cert_path), pki.server_context(cert, key), hosts
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f"TLS certificate {cert} / key {key} unusable: {exc}") from exc

    async def _admin_token(self, store: Store) -> str:
        env_token = self.env.get("OTABOX_ADMIN_TOKEN", "").strip()
        if env_token:
            await store.set_kv(ADMIN_TOKEN_KEY, hash_token(env_token))
            return hash_token(env_token)
        stored = await store.get_kv(ADMIN_TOKEN_KEY)
        if stored:
            return stored
        token = new_token()
        await store.set_kv(ADMIN_TOKEN_KEY, hash_token(token))
        self.printed_token = token
        return hash_token(token)

    async def _scheduled_backups(self) -> None:
        """A backup every `backup_every` seconds into `backup_dir`, keeping the newest `backup_keep`.

        Stopping waits for a backup being written to finish (`_backups_stop`), rather than
        cancelling it: its thread would go on writing regardless and leave a `.part` behind.
        """
        s = self.settings
        folder = Path(s.backup_dir).expanduser() if s.backup_dir else self.data_dir / "backups"
        signing = Path(s.signing_key).expanduser() if s.signing_key else None
        while True:
            try:
                async with asyncio.timeout(s.backup_every):
                    await self._backups_stop.wait()
                return
            except TimeoutError:
                pass
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # Microseconds in the name: two backups in one second must not overwrite each other.
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:] + "Z"
                name = folder / f"otabox-backup-{stamp}.tar.gz"
                await asyncio.to_thread(backup.write_file, self.data_dir, name, signing_key=signing)
                await asyncio.to_thread(backup.prune, folder, s.backup_keep)
                log.info("scheduled backup written to %s", name)
            except Exception:
                log.exception("scheduled backup failed")

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._backups is not None:
            self._backups_stop.set()
            await asyncio.gather(self._backups, return_exceptions=True)
        if self.services is not None:
            self.services.status.ready.clear()
        parts: list[_Stoppable | None] = [self.webhooks, self.nodes, self.engine, self.cluster, self.deltas, self._lag]
        for part in parts:
            if part is not None:
                await part.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        for sock in self._http_socks:
            sock.close()
        if self.broker is not None:
            try:
                await self.broker.shutdown()
            except Exception:
                log.exception("broker shutdown failed")
        if self.store is not None:
            await self.store.close()
        if self._lock is not None:
            # Only the server holding the lock wrote ports.json; a clean stop takes it back.
            (self.data_dir / "ports.json").unlink(missing_ok=True)
            os.close(self._lock)  # releases the lock
            self._lock = None
        log.info("otabox stopped")


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class DataDirLocked(OSError):
    """Another otabox process serves this data dir."""


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock for this process's lifetime; returns the lock's fd.

    Raises DataDirLocked when another server holds it: two servers on one data dir would both
    write the database and fight over ports.json. The kernel drops the lock when the process
    dies, however it dies, so a crash never leaves a stale lock behind.
    """
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DataDirLocked(f"{data_dir} is in use by another otabox server (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def tune_gc() -> None:
    """Collect garbage less often, and never re-scan what start-up built.

    With thousands of connections the heap holds hundreds of thousands of long-lived objects; the default
    thresholds run a full collection over all of them every few thousand allocations, which a
    push fan-out or a progress burst triggers several times per second (measured: half of a
    1000-device push went to collection). Freezing moves the start-up objects out of the scans.
    """
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 100)


class AcceptFailures:
    """The event loop's handler of its own errors, quieter when the open files run out.

    asyncio (3.11) answers EMFILE on a listening socket by logging a traceback for every accept()
    it goes on trying in that wake-up, up to the listen backlog (4,096 here), and again after
    each one-second pause: a node at its open-files limit in a reconnect wave logged 200,000
    tracebacks in 3 minutes, spending the CPU it needed to recover. Those become one WARNING per
    `every` seconds with their count; every other error goes to the default handler.
    """

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, limit: int, every: float = 10.0) -> None:
        self.limit = limit
        self.every = every
        self.count = 0  # since start, for /metrics and the tests
        self._unreported = 0
        self._reported_at = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self.MESSAGE:
            loop.default_exception_handler(context)
            return
        self.count += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported_at >= self.every:
            log.warning(
                "open files exhausted (limit %d): new connections wait (%d accept failure(s) since the last"
                " report: %s); raise the hard limit (LimitNOFILE=) or add a node",
                self.limit,
                self._unreported,
                context.get("exception"),
            )
            self._reported_at, self._unreported = now, 0


async def collect_periodically(every: float = GC_FULL_EVERY) -> None:
    """A full garbage collection every `every` seconds.

    With `tune_gc`'s thresholds CPython runs one only after ~100 million net allocations, and
    whatever dies in a reference cycle after reaching the old generation waits for it: under
    churn (connections, HTTP requests, asyncio's own cycles) RSS grew by 1.35 GB/h in the soak
    before the largest cycles were broken (`mqtt.connection`). One pass over the live objects
    (start-up's are frozen) takes tens of milliseconds at 10,000 devices; every few minutes it
    bounds what the rest can pile up.
    """
    while True:
        await asyncio.sleep(every)
        started = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d object(s) in %.0f ms", found, 1000 * (time.perf_counter() - started))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound(sock: socket.socket | None) -> int | None:
    return None if sock is None else int(sock.getsockname()[1])


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard one (each device holds a socket); returns it.

    The hard limit is the host's to set (systemd LimitNOFILE=, ulimit -Hn): docs/deployment.md.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
    return soft


def _default_public_url(scheme: str, host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
        log.warning("fileUrls will use %s; set --public-url to the address devices reach", host)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    files = raise_open_files_limit()
    log.info(
        "open files limit %d: room for about %d connected devices (raise the hard limit for more: LimitNOFILE=)",
        files,
        settings.mqtt_max_connections or max(0, files - SPARE_FILES),
    )
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptFailures(files))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except (OSError, StorageUnavailable, StorageConfigError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    tune_gc()
    collector = asyncio.create_task(collect_periodically(), name="otabox-gc")
    if app.printed_token:
        print(f"Admin token (shown once, only its hash is stored): {app.printed_token}", flush=True)
    assert app.services is not None
    listening = ", ".join(f"{name.upper()} port {port}" for name, port in app.services.status.ports().items())
    print(f"otabox {app.version}: {listening}; fileUrls {app.public_url}; data {app.data_dir}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        collector.cancel()
        await app.stop()
    return 0

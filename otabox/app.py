"""The one place where the process is assembled and torn down.

Start order: data dir and keys -> store -> broker -> HTTP -> scheduler. Stop runs in
reverse and is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from otabox import __version__
from otabox.artifacts import Artifacts
from otabox.broker import OtaBroker
from otabox.devices import DeviceService, LoginLimiter
from otabox.keys import Keys, Signer, hash_token, new_token, write_private
from otabox.scheduler import Scheduler
from otabox.settings import Settings
from otabox.store import Store
from otabox.web import build_app

log = logging.getLogger(__name__)

ADMIN_TOKEN_KEY = "admin_token_sha256"


class App:
    """One otabox server: store, broker, HTTP site and scheduler in one event loop."""

    def __init__(self, settings: Settings, *, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = dict(os.environ) if env is None else env
        self.version = __version__
        self.data_dir = Path(settings.data_dir).resolve()
        self.ready = False
        self.store: Store = None  # type: ignore[assignment]
        self.keys: Keys = None  # type: ignore[assignment]
        self.artifacts: Artifacts = None  # type: ignore[assignment]
        self.broker: OtaBroker | None = None
        self.devices: DeviceService = None  # type: ignore[assignment]
        self.scheduler: Scheduler = None  # type: ignore[assignment]
        self.signer: Signer | None = None
        self.admin_token_hash = ""
        self.printed_token: str | None = None
        self.http_port = 0
        self.mqtt_port = 0
        self.public_url = ""
        self._runner: web.AppRunner | None = None
        self._stopped = False
        self._started = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every component; on failure, stop what was started and re-raise."""
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.keys = Keys.load_or_create(self.data_dir)
        if self.settings.signing_key:
            self.signer = Signer.load_or_create(Path(self.settings.signing_key).expanduser())
        self.store = await Store.open(self.data_dir / "otabox.db")
        await self.store.mark_all_offline()
        await self._admin_token()
        self.artifacts = Artifacts(self.data_dir / "firmware")
        limiter = LoginLimiter(self.settings.login_fail_limit, self.settings.login_fail_window)
        self.devices = DeviceService(self.store, self.keys, limiter)

        self.broker = OtaBroker(
            self.devices, self.settings.host, self.settings.mqtt_port, self.settings.connect_timeout
        )
        await self.broker.start()
        self.devices.sender = self.broker
        self.mqtt_port = self.broker.port
        self.scheduler = Scheduler(self.store, self.broker, self, self.settings.scheduler_interval)
        self.devices.jobs = self.scheduler

        self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.http_port)
        await site.start()
        self.http_port = self._bound_http_port()
        self.public_url = (self.settings.public_url or self._default_public_url()).rstrip("/")

        self.scheduler.start()
        write_private(
            self.data_dir / "ports.json",
            json.dumps({"http": self.http_port, "mqtt": self.mqtt_port}).encode(),
        )
        self.ready = True
        log.info(
            "otabox %s ready: HTTP %s, MQTT port %s, data in %s",
            self.version,
            self.public_url,
            self.mqtt_port,
            self.data_dir,
        )

    def _bound_http_port(self) -> int:
        assert self._runner is not None
        for addr in self._runner.addresses:
            if isinstance(addr, tuple):
                return int(addr[1])
        raise RuntimeError("HTTP site did not bind")

    def _default_public_url(self) -> str:
        host = self.settings.host
        if host in ("", "0.0.0.0", "::"):
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
            log.warning("fileUrls will use %s; set --public-url to the address devices reach", host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.http_port}"

    async def _admin_token(self) -> None:
        env_token = self.env.get("OTABOX_ADMIN_TOKEN", "").strip()
        if env_token:
            self.admin_token_hash = hash_token(env_token)
            await self.store.set_kv(ADMIN_TOKEN_KEY, self.admin_token_hash)
            return
        stored = await self.store.get_kv(ADMIN_TOKEN_KEY)
        if stored:
            self.admin_token_hash = stored
            return
        token = new_token()
        self.admin_token_hash = hash_token(token)
        await self.store.set_kv(ADMIN_TOKEN_KEY, self.admin_token_hash)
        self.printed_token = token

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.broker is not None:
            try:
                await self.broker.shutdown()
            except Exception:
                log.exception("broker shutdown failed")
        if self.store is not None:
            await self.store.close()
        log.info("otabox stopped")

    # ------------------------------------------------------------ services used by the API

    def file_url(self, fw: dict[str, Any], device_key: str) -> str:
        token = self.keys.download_token(fw["id"], fw["productKey"], device_key, self.settings.download_token_ttl)
        return f"{self.public_url}/firmware/{fw['id']}/{fw['fileName']}?token={token}"

    async def devices_created(self, product_key: str, device_keys: list[str]) -> None:
        """Devices were registered: incremental jobs whose scope they match pick them up."""
        if not await self.scheduler.incremental_jobs(product_key):
            return  # the common case, and one query for a whole import
        for dk in device_keys:
            await self.scheduler.join_incremental(product_key, dk)

    async def current_task(self, product_key: str, device_key: str) -> dict[str, Any] | None:
        return await self.store.active_task(product_key, device_key)

    async def active_jobs_using(self, firmware_id: str) -> list[str]:
        return await self.store.jobs_using_firmware(firmware_id)


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; returns the process exit code."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if app.printed_token:
        print(f"Admin token (shown once, only its hash is stored): {app.printed_token}", flush=True)
    print(
        f"otabox {app.version}: HTTP {app.public_url} (port {app.http_port}), MQTT port {app.mqtt_port},"
        f" data {app.data_dir}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await app.stop()
    return 0

"""A fleet of simulated devices in one event loop: `otabox simulate`'s engine.

Sized for 10,000 devices on two cores: each device (otabox.sim.simdevice) is a slotted object
plus one `otabox.device.mqtt` connection, whose reader is the only long-lived task per device.
Behaviours run as short-lived tasks started from message callbacks; churn and request-mode
polling use timer handles and one shared poller task. Downloads are real HTTP GETs through
one shared aiohttp session with a bounded connector, hashed on the fly (nothing is stored).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from otabox import protocol
from otabox.device.mqtt import small_tls_buffers
from otabox.sim.simdevice import (
    FAILED,
    OUTCOMES,
    REFUSED,
    SILENT,
    SUCCEEDED,
    TERMINAL,
    UPGRADING,
    WAITING,
    SimDevice,
)

__all__ = ["FAILED", "OUTCOMES", "REFUSED", "SILENT", "SUCCEEDED", "UPGRADING", "WAITING", "Fleet", "FleetConfig"]

log = logging.getLogger(__name__)

Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Everything a fleet run needs; times in seconds, ranges are uniform (low, high)."""

    host: str
    port: int
    product_key: str
    request_mode: bool = False
    poll: float = 10.0
    flash_time: Range = (0.5, 2.0)
    reboot_time: Range = (1.0, 3.0)
    download_speed: Range | None = None  # bytes/second per device; None = as fast as it comes
    churn_interval: Range = (2.0, 10.0)
    connect_concurrency: int = 500
    http_connections: int = 256
    keepalive: int = 60
    duration: float | None = None
    # Keep serving after every device has an outcome (a retry may still come); stop() ends it.
    until_stopped: bool = False
    seed: int | None = None
    live: bool = False
    # MQTT over TLS: the context (pinned CA) every device connects with, unless it has its own
    # (a device certificate, `Fleet(..., tls_by_device=)`); also checks https fileUrls.
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # the name the server certificate is checked against [host]


class Fleet:
    """Runs devices until every one reached a terminal outcome, `duration` passed, or `stop()`."""

    def __init__(
        self,
        config: FleetConfig,
        devices: list[tuple[str, str, str, str]],
        tls_by_device: dict[str, ssl.SSLContext] | None = None,
    ) -> None:
        """`devices`: (deviceKey, deviceSecret, version, behaviour) tuples. `tls_by_device`: a TLS
        context per deviceKey (its device certificate) for those that present one."""
        self.config = config
        self.rng = random.Random(config.seed)
        self.timestamp = str(time.time() * 1000)
        own = tls_by_device or {}
        self.devices = [
            SimDevice(self, dk, secret, version, b, own.get(dk, config.tls)) for dk, secret, version, b in devices
        ]
        self.counts: Counter[str] = Counter({WAITING: len(self.devices)})
        self.remaining = len(self.devices)
        self.connected = 0
        self.connect_failures = 0
        self.reconnects = 0
        self.churns = 0
        self.resumes = 0
        self.downloaded = 0
        self.deltas_used = 0
        self.delta_fallbacks = 0
        self.stopping = False
        self.stopped_by = ""
        self.started = 0.0
        self.connect_seconds: float | None = None  # until every device had its first connect attempt
        self.http: aiohttp.ClientSession = None  # type: ignore[assignment]  # created in run()
        self._ids = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._done = asyncio.Event()

    def next_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    def spawn(self, aw: Awaitable[Any]) -> None:
        """Run a short-lived coroutine, holding a reference; failures are logged, never lost."""
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated device task failed", exc_info=task.exception())

    def outcome_changed(self, old: str, new: str) -> None:
        self.counts[old] -= 1
        self.counts[new] += 1
        if old in TERMINAL and new not in TERMINAL:
            self.remaining += 1  # a failed device took a retry
            self._done.clear()
        elif old not in TERMINAL and new in TERMINAL:
            self.remaining -= 1
            if self.remaining <= 0 and not self.config.until_stopped:
                self._done.set()

    def stop(self, reason: str = "interrupted") -> None:
        """Ask the run to end now (e.g. on Ctrl-C); run() returns the summary."""
        self.stopped_by = self.stopped_by or reason
        self._done.set()

    async def run(self) -> dict[str, Any]:
        """Connect every device, serve offers until done, disconnect; return the summary."""
        cfg = self.config
        if any(d.tls is not None for d in self.devices):
            small_tls_buffers()  # 16 KiB per TLS connection instead of asyncio's 256 KiB
        self.started = time.monotonic()
        connector = aiohttp.TCPConnector(
            limit=cfg.http_connections,
            limit_per_host=cfg.http_connections,
            ssl=cfg.tls if cfg.tls is not None else True,  # https fileUrls: the pinned CA
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as self.http:
            helpers = [asyncio.create_task(self._connect_all())]
            if cfg.request_mode:
                helpers.append(asyncio.create_task(self._poll()))
            if cfg.live:
                helpers.append(asyncio.create_task(self._live()))
            try:
                async with asyncio.timeout(cfg.duration):
                    await self._done.wait()
                self.stopped_by = self.stopped_by or "done"
            except TimeoutError:
                self.stopped_by = "duration"
            finally:
                await self._shutdown(helpers)
        return self.summary()

    async def _connect_all(self) -> None:
        # Bounded concurrency without a task per device: a few hundred workers share one iterator.
        devices: Iterator[SimDevice] = iter(self.devices)

        async def worker() -> None:
            for dev in devices:
                if self.stopping:
                    return
                if not await dev.connect() and dev.outcome != REFUSED:
                    self.spawn(dev.reconnect(1.0))

        await asyncio.gather(*(worker() for _ in range(max(1, self.config.connect_concurrency))))
        self.connect_seconds = round(time.monotonic() - self.started, 3)

    async def _poll(self) -> None:
        """Request mode: every `poll` seconds each waiting device asks for offers, spread over the interval.

        Until stopped (a run that follows a job), failed devices keep asking too: the job's retry
        policy may grant them another attempt, which a request-mode device only gets by asking.
        """
        cfg = self.config
        batch = 200
        asking = (WAITING, FAILED) if cfg.until_stopped else (WAITING,)
        while True:
            started = time.monotonic()
            waiting = [d for d in self.devices if d.outcome in asking and d.client.connected]
            pause = cfg.poll / max(1, (len(waiting) + batch - 1) // batch)
            for i in range(0, len(waiting), batch):
                for dev in waiting[i : i + batch]:
                    if dev.outcome in asking and dev.client.connected:
                        await dev.send(protocol.GETVERSION, "ota.device.getversion", {})
                await asyncio.sleep(pause)
            await asyncio.sleep(max(0.0, cfg.poll - (time.monotonic() - started)))

    async def _live(self) -> None:
        while True:
            sys.stderr.write("\r" + self.status_line() + "\033[K")
            sys.stderr.flush()
            await asyncio.sleep(0.5)

    def status_line(self) -> str:
        c = self.counts
        return (
            f"{time.monotonic() - self.started:6.1f}s  connected {self.connected}/{len(self.devices)}"
            f"  waiting {c[WAITING]}  upgrading {c[UPGRADING]}  succeeded {c[SUCCEEDED]}"
            f"  failed {c[FAILED]}  silent {c[SILENT]}" + (f"  refused {c[REFUSED]}" if c[REFUSED] else "")
        )

    async def _shutdown(self, helpers: list[asyncio.Task[Any]]) -> None:
        self.stopping = True
        for task in [*helpers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*helpers, *self._tasks, return_exceptions=True)
        if self.config.live:
            sys.stderr.write("\r" + self.status_line() + "\033[K\n")
            sys.stderr.flush()
        for dev in self.devices:
            if dev.timer is not None:
                dev.timer.cancel()
            dev.want_offline = True
            dev.client.close()

    def summary(self) -> dict[str, Any]:
        """Counts per outcome and, per behaviour, devices assigned and their outcomes."""
        per: dict[str, dict[str, Any]] = {}
        for dev in self.devices:
            entry = per.setdefault(dev.behaviour, {"assigned": 0, "outcomes": Counter()})
            entry["assigned"] += 1
            entry["outcomes"][dev.outcome] += 1
        return {
            "devices": len(self.devices),
            "mode": "request" if self.config.request_mode else "push",
            "elapsedSeconds": round(time.monotonic() - self.started, 3),
            "stoppedBy": self.stopped_by,
            "outcomes": {o: self.counts[o] for o in OUTCOMES if self.counts[o]},
            "behaviours": {
                b: {"assigned": e["assigned"], "outcomes": dict(sorted(e["outcomes"].items()))}
                for b, e in sorted(per.items())
            },
            "connectSeconds": self.connect_seconds,
            "connectFailures": self.connect_failures,
            "reconnects": self.reconnects,
            "churnDisconnects": self.churns,
            "resumedDownloads": self.resumes,
            "downloadedBytes": self.downloaded,
            "deltasUsed": self.deltas_used,
            "deltaFallbacks": self.delta_fallbacks,
        }

"""One simulated device of `otabox simulate`: login, offers, behaviours, real downloads.

A `SimDevice` is a slotted object plus one `otabox.device.mqtt` connection; everything it does
runs in callbacks and short-lived tasks that its `Fleet` (otabox.sim.fleet) holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import aiohttp

from otabox import protocol
from otabox.device.download import DownloadError, Offer, OfferError, VerifyError, check, fetch, new_hasher
from otabox.device.mqtt import ConnectRefused, MQTTLiteClient, MQTTLiteError


class Fleet(Protocol):
    """What a simulated device needs of the fleet that runs it (`otabox.sim.fleet.Fleet`)."""

    config: Any
    rng: random.Random
    timestamp: str
    http: aiohttp.ClientSession
    stopping: bool
    connected: int
    connect_failures: int
    reconnects: int
    churns: int
    resumes: int
    downloaded: int
    deltas_used: int
    delta_fallbacks: int

    def next_id(self) -> str: ...

    def spawn(self, aw: Awaitable[Any]) -> None: ...

    def outcome_changed(self, old: str, new: str) -> None: ...


log = logging.getLogger(__name__)

# Device outcomes. Terminal ones end a device's part in the run; the others are where it stands.
WAITING = "waiting"  # connected or connecting, no offer yet
UPGRADING = "upgrading"
SUCCEEDED = "succeeded"  # booted the offered version and reported it
FAILED = "failed"  # reported a failure step, or booted an unexpected version
SILENT = "silent"  # took the offer and never said anything (the server times it out)
REFUSED = "refused"  # the server refused its login
TERMINAL = frozenset({SUCCEEDED, FAILED, SILENT, REFUSED})
OUTCOMES = (WAITING, UPGRADING, SUCCEEDED, FAILED, SILENT, REFUSED)

REPLY_TIMEOUT = 10.0  # seconds to wait for the server's reply to a report that matters
RECONNECT_MAX = 30.0  # backoff cap after unexpected disconnects
DOWNLOAD_ATTEMPTS = 3  # real network failures (not simulated ones) are retried with Range


class SimDevice:
    """One simulated device. Slots only: 10,000 of these must stay small."""

    __slots__ = (
        "attempts",
        "behaviour",
        "client",
        "fleet",
        "key",
        "outcome",
        "rebooting",
        "reply",
        "secret",
        "timer",
        "tls",
        "version",
        "want_offline",
    )

    def __init__(
        self, fleet: Fleet, key: str, secret: str, version: str, behaviour: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.fleet = fleet
        self.tls = tls  # MQTT over TLS (shared, or this device's own with its certificate); None: plain TCP
        self.key = key
        self.secret = secret
        self.version = version
        self.behaviour = behaviour
        self.outcome = WAITING
        self.attempts = 0
        self.want_offline = False  # set before closing on purpose, so on_disconnect doesn't reconnect
        self.rebooting = False  # between "rebooting" and coming back with the new image: no reconnects
        self.reply: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.client = MQTTLiteClient(self.on_message, self.on_disconnect)

    # ------------------------------------------------------------ connection

    async def connect(self, wait_reply: bool = False) -> bool:
        """Log in and report the version. False when refused (terminal) or unreachable."""
        f = self.fleet
        cfg = f.config
        ts = f.timestamp
        password = protocol.sign(protocol.login_params(self.key, cfg.product_key, ts), self.secret, "hmacsha256")
        try:
            await self.client.connect(
                cfg.host,
                cfg.port,
                protocol.client_id_for(self.key, "hmacsha256", ts),
                f"{self.key}&{cfg.product_key}",
                password,
                keepalive=cfg.keepalive,
                tls=self.tls,
                server_hostname=cfg.server_hostname,
            )
        except ConnectRefused as exc:
            log.warning("%s: login refused: %s", self.key, exc)
            self.finish(REFUSED)
            return False
        except (OSError, TimeoutError, MQTTLiteError) as exc:
            log.info("%s: connect failed: %r", self.key, exc)
            f.connect_failures += 1
            return False
        f.connected += 1
        code = await self.send(protocol.INFORM, "ota.device.inform", {"version": self.version}, wait_reply=wait_reply)
        if self.behaviour == "churn" and self.outcome == WAITING:
            self.arm_churn()
        # With wait_reply, connected is not enough: the server must have heard the version (a
        # server that dies right after CONNACK never does).
        return code != 0 or not wait_reply

    async def reconnect(self, delay: float) -> None:
        """Connect again after `delay`, backing off with jitter until it works or the fleet stops."""
        f = self.fleet
        while not f.stopping and self.outcome != REFUSED:
            await asyncio.sleep(delay * f.rng.uniform(0.5, 1.0))
            if f.stopping or self.client.connected or self.rebooting:
                return
            if await self.connect():
                return
            delay = min(delay * 2, RECONNECT_MAX)

    def on_disconnect(self, exc: BaseException | None) -> None:
        f = self.fleet
        f.connected -= 1
        if self.reply is not None and not self.reply[1].done():
            self.reply[1].set_result({})  # a reply will not come on this connection
        if self.want_offline:
            self.want_offline = False
            return
        if not f.stopping:
            f.reconnects += 1
            f.spawn(self.reconnect(0.5))

    def go_offline(self) -> None:
        self.want_offline = True
        self.client.close()

    def arm_churn(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        lo, hi = self.fleet.config.churn_interval
        self.timer = asyncio.get_running_loop().call_later(self.fleet.rng.uniform(lo, hi), self.churn)

    def churn(self) -> None:
        self.timer = None
        f = self.fleet
        if f.stopping or self.outcome != WAITING or not self.client.connected:
            return
        f.churns += 1
        self.go_offline()
        f.spawn(self.reconnect(f.rng.uniform(0.2, 1.0)))

    # ------------------------------------------------------------ messages

    async def send(self, suffix: str, method: str, params: dict[str, Any], *, wait_reply: bool = False) -> int:
        """Publish a request (QoS 0). With wait_reply, wait for its reply and return its code (0 if none)."""
        f = self.fleet
        if not self.client.connected and (not wait_reply or not await self.wait_online()):
            return 0
        msg_id = f.next_id()
        payload = protocol.request(msg_id, method, params)
        topic = protocol.topic_for(f.config.product_key, self.key, suffix)
        if not wait_reply:
            try:
                await self.client.publish(topic, payload)
            except MQTTLiteError:
                pass  # best effort; the connection's loss is handled by on_disconnect
            return 0
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reply = (msg_id, fut)
        try:
            await self.client.publish(topic, payload)
            async with asyncio.timeout(REPLY_TIMEOUT):
                reply = await fut
            return int(reply.get("code") or 0)
        except (MQTTLiteError, TimeoutError):
            return 0
        finally:
            self.reply = None

    async def report(self, step: int, desc: str, *, wait_reply: bool = False) -> None:
        # EnOS SDKs send the step as a string.
        await self.send(
            protocol.PROGRESS, "ota.device.progress", {"step": str(step), "desc": desc}, wait_reply=wait_reply
        )

    async def wait_online(self, timeout: float = 30.0) -> bool:
        """Wait (briefly polling, no per-device event) until the connection is back."""
        deadline = time.monotonic() + timeout
        while not self.client.connected:
            if self.fleet.stopping or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/" + protocol.UPGRADE):
            self.on_offer(protocol.request_id(payload), _params(payload))
        elif topic.endswith("_reply"):
            try:
                data = json.loads(payload)
            except ValueError:
                return
            if not isinstance(data, dict):
                return
            if self.reply is not None and str(data.get("id")) == self.reply[0] and not self.reply[1].done():
                self.reply[1].set_result(data)
            elif topic.endswith(protocol.GETVERSION + "_reply") and data.get("data"):
                offers = data["data"]
                if isinstance(offers, list):
                    self.on_offer(None, offers[0])

    def on_offer(self, msg_id: Any, params: Any) -> None:
        # Busy, or finished for good: a redelivered or repeated offer is ignored. A failed device
        # takes a retry (the job's retry policy) and fails the same way again.
        if self.outcome not in (WAITING, FAILED):
            return
        try:
            offer = Offer.from_params(params)
        except OfferError as exc:
            log.warning("%s: unusable offer: %s", self.key, exc)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.set_outcome(UPGRADING)
        self.attempts += 1
        self.fleet.spawn(self.upgrade(offer))

    # ------------------------------------------------------------ the upgrade

    def set_outcome(self, outcome: str) -> None:
        self.fleet.outcome_changed(self.outcome, outcome)
        self.outcome = outcome

    finish = set_outcome

    async def upgrade(self, offer: Offer) -> None:
        try:
            await self._upgrade(offer)
        except Exception:
            log.exception("%s: simulated upgrade crashed", self.key)
            self.finish(FAILED)

    async def _upgrade(self, offer: Offer) -> None:
        b = self.behaviour
        f = self.fleet
        cfg = f.config
        if b == "silent":
            self.finish(SILENT)
            return
        if b == "decline":
            await self.report(protocol.STEP_DECLINED, "declined by the device (simulated)", wait_reply=True)
            self.finish(FAILED)
            return
        await self.report(0, "downloading", wait_reply=True)
        step, desc = await self.fetch_image(offer)
        if step < 0:
            await self.report(step, desc, wait_reply=True)
            self.finish(FAILED)
            return
        await self.report(90, "flashing")
        await asyncio.sleep(f.rng.uniform(*cfg.flash_time))
        if b == "flash-fail":
            await self.report(protocol.STEP_FLASH_FAILED, "flash write failed (simulated)", wait_reply=True)
            self.finish(FAILED)
            return
        await self.report(100, "rebooting", wait_reply=True)
        self.rebooting = True
        self.go_offline()
        await asyncio.sleep(f.rng.uniform(*cfg.reboot_time))
        self.version = offer.version if b != "wrong-version" else (offer.version + "-unexpected")[:64]
        self.want_offline = False
        if self.client.connected:
            # A reconnect under way when the reboot began (the server had dropped the connection
            # just before) came back with the old image: it is not what the rebooted device says.
            self.want_offline = True
            self.client.close()
        self.rebooting = False
        while not await self._tell_version():
            if f.stopping or self.outcome == REFUSED:
                return
            await asyncio.sleep(1.0)
        self.finish(FAILED if b == "wrong-version" else SUCCEEDED)

    async def _tell_version(self) -> bool:
        """Connect if need be (a reconnect may have beaten us to it) and have the server acknowledge the version."""
        if self.client.connected:
            params = {"version": self.version}
            return await self.send(protocol.INFORM, "ota.device.inform", params, wait_reply=True) != 0
        return await self.connect(wait_reply=True)

    async def _between_chunks(self, step: int, pct: int, pause: float) -> None:
        # Inline, not spawned: progress must reach the server before a later failure report.
        if step >= 0:
            await self.report(step, f"downloaded {pct}%")
        if pause > 0.005:
            await asyncio.sleep(pause)  # throttled to this device's download speed

    async def fetch_image(self, offer: Offer) -> tuple[int, str]:
        """The new image by the delta when this device takes deltas and one is offered from its
        version, else (or when the delta fails) by the full download. Like `download`'s result."""
        patch = offer.delta
        if self.behaviour not in ("delta", "delta-broken") or patch is None or patch.source != self.version:
            return await self.download(offer)
        f = self.fleet
        step, desc = await self.download(patch.offer)
        if step == 0 and self.behaviour == "delta":
            # Simulated: no flash holds the old image, so the patch's own digest check stands in
            # for the rebuilt image's.
            f.deltas_used += 1
            await self.report(
                80, f"rebuilt from a delta of {patch.offer.file_size} bytes from {patch.source} (simulated)"
            )
            return 0, ""
        f.delta_fallbacks += 1
        why = desc or "the patch did not apply (simulated)"
        await self.report(0, f"delta failed ({why}); downloading the full image")
        return await self.download(offer)

    async def download(self, offer: Offer) -> tuple[int, str]:
        """Really download and check the file. Returns (0, "") or the failure step and its desc."""
        f = self.fleet
        cfg = f.config
        size = offer.file_size
        cut: int | None = None
        if self.behaviour in ("download-fail", "offline-mid-download") and size > 1:
            cut = max(1, int(size * f.rng.uniform(0.2, 0.8)))
        hasher = new_hasher(offer.sign_method)
        got = 0
        last_pct = 0
        rate = f.rng.uniform(*cfg.download_speed) if cfg.download_speed else 0.0
        t0 = time.monotonic()

        def on_start(start: int, total: int) -> None:
            nonlocal hasher, got
            if start != got:  # Range ignored: the whole file comes again
                hasher, got = new_hasher(offer.sign_method), 0

        def on_chunk(chunk: bytes) -> Awaitable[Any] | None:
            nonlocal got, last_pct
            hasher.update(chunk)
            got += len(chunk)
            f.downloaded += len(chunk)
            pct = 100 * got // size if size else 100
            step = -1
            if last_pct + 10 <= pct < 100:
                last_pct = pct - pct % 10
                step = last_pct * 80 // 100  # download is 0..80 of the whole upgrade
            ahead = got / rate - (time.monotonic() - t0) if rate else 0.0
            if step >= 0 or ahead > 0.005:
                return self._between_chunks(step, last_pct, ahead)
            return None

        errors = 0
        while True:
            try:
                await fetch(f.http, offer.file_url, got, on_chunk, on_start=on_start, limit=cut)
                break
            except DownloadError as exc:
                if cut is not None:
                    cut = None
                    if self.behaviour == "download-fail":
                        return protocol.STEP_DOWNLOAD_FAILED, f"download failed at {got} bytes (simulated)"
                    # offline-mid-download: lose the link entirely, come back, resume with Range.
                    f.resumes += 1
                    self.go_offline()
                    await asyncio.sleep(f.rng.uniform(*cfg.reboot_time))
                    self.want_offline = False
                    if not self.client.connected:
                        await self.connect(wait_reply=True)
                    continue
                errors += 1
                if not exc.retryable or errors >= DOWNLOAD_ATTEMPTS:
                    return protocol.STEP_DOWNLOAD_FAILED, str(exc)
                await asyncio.sleep(0.5 * errors)
        try:
            check(offer, got, hasher.hexdigest())
        except VerifyError as exc:
            return protocol.STEP_VERIFY_FAILED, str(exc)
        if self.behaviour == "verify-fail":
            return protocol.STEP_VERIFY_FAILED, "signature check failed (simulated)"
        return 0, ""


def _params(payload: bytes) -> Any:
    try:
        return protocol.parse_request(payload).params
    except protocol.ProtocolError:
        return None

"""Asyncio device SDK for otabox (and EnOS-compatible servers): login, pushes, offers, download, reports.

One `Device` is one MQTT connection kept alive in the background over aiomqtt, with
auto-reconnect (exponential backoff with jitter) and a version report on every connect.
The wire format is docs/protocol.md; `examples/device.py` shows a whole
upgrade: receive -> confirm -> download + verify -> flash -> reboot -> report the version.

    async with Device(host, 1883, "thermo", "dev-001", secret, version="1.0.0",
                      on_upgrade=handle) as device:
        await device.stopped()
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

try:
    import aiomqtt
except ImportError:  # pragma: no cover - depends on the install
    # Importable without it (the server binary bundles every otabox module); start() says what is missing.
    aiomqtt = None  # type: ignore[assignment]

from otabox import delta as deltas
from otabox import protocol
from otabox.delta import DeltaError
from otabox.device.download import (
    DeltaOffer,
    DownloadError,
    Offer,
    OfferError,
    VerifyError,
    check_file,
    load_public_key,
    to_file,
)
from otabox.device.tls import fetch_ca, make_tls_context

__all__ = [
    "Decision",
    "Device",
    "DeviceError",
    "DeviceTimeout",
    "DownloadFailed",
    "FailureCode",
    "FlashFailed",
    "LoginRefused",
    "Offer",
    "RequestFailed",
    "UpgradeFailed",
    "VerificationFailed",
    "fetch_ca",
    "fetch_signing_key",
    "make_tls_context",
]

log = logging.getLogger(__name__)

# Reconnect backoff: the first retry comes quickly (a broker restart is usually short), later ones
# spread out so a fleet does not hammer a recovering server; jitter de-synchronises the fleet.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
# Download retries resume with Range; a few attempts ride out short outages without hiding a dead URL.
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_RETRY_DELAY = 0.5  # seconds, times the attempt number
_REFUSED_CODES = {4, 5, 134, 135}  # CONNACK bad user name or password / not authorized (3.1.1 and paho's v5 codes)


class FailureCode(enum.IntEnum):
    """Negative progress steps (spec 3.3) a device reports when an upgrade fails."""

    FAILED = protocol.STEP_FAILED
    DOWNLOAD = protocol.STEP_DOWNLOAD_FAILED
    VERIFY = protocol.STEP_VERIFY_FAILED
    FLASH = protocol.STEP_FLASH_FAILED
    DECLINED = protocol.STEP_DECLINED


class Decision(enum.StrEnum):
    """What `Device.process` did with an offer."""

    ACCEPTED = "accepted"  # confirmed; on_upgrade ran (and may have failed, which it reported)
    DECLINED = "declined"  # the confirm hook said no; step -5 was reported
    DEFERRED = "deferred"  # the confirm hook said "not now"; nothing reported, kept in `deferred`
    BUSY = "busy"  # another upgrade is running on this device; ignored


class DeviceError(Exception):
    """Base class of the SDK's errors."""


class LoginRefused(DeviceError):
    """The server refused the login (unknown device, wrong secret, locked out)."""


class DeviceTimeout(DeviceError, TimeoutError):
    """No connection or no reply within the allowed time."""


class RequestFailed(DeviceError):
    """The server answered a request with a code other than 200."""

    def __init__(self, code: int, message: str | None) -> None:
        super().__init__(f"server answered {code}: {message or ''}".rstrip(": "))
        self.code = code
        self.message = message


class UpgradeFailed(DeviceError):
    """An upgrade step failed. Raised from `on_upgrade`, it is reported as `code` (unless `reported`)."""

    code: FailureCode = FailureCode.FAILED

    def __init__(self, desc: str, *, code: FailureCode | None = None, reported: bool = False) -> None:
        super().__init__(desc)
        if code is not None:
            self.code = code
        self.desc = desc
        self.reported = reported


class DownloadFailed(UpgradeFailed):
    """The firmware could not be downloaded (step -2)."""

    code = FailureCode.DOWNLOAD


class VerificationFailed(UpgradeFailed):
    """The downloaded file does not match the offer's fileSize or sign (step -3)."""

    code = FailureCode.VERIFY


class FlashFailed(UpgradeFailed):
    """Writing the firmware failed (step -4); raise it from `on_upgrade`."""

    code = FailureCode.FLASH


class _Lost(Exception):
    """The connection went away while a request waited for its reply."""


UpgradeHandler = Callable[[Offer], Awaitable[None] | None]
ConfirmHook = Callable[[Offer], bool | Awaitable[bool | None] | None]


class Device:
    """One device: a background MQTT connection plus the OTA requests a device makes.

    Construct, then `await start()` (or `async with`). Callbacks run in the device's event loop:
    `confirm(offer)` returns True to go ahead (default), False to decline (step -5 is reported),
    None to defer (nothing reported; the offer waits in `deferred` for a later `process`).
    `on_upgrade(offer)` then does the work: `download`, flash, reboot, `report_version`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        product_key: str,
        device_key: str,
        device_secret: str,
        *,
        version: str,
        sign_method: str = "hmacsha256",
        on_upgrade: UpgradeHandler | None = None,
        confirm: ConfirmHook | None = None,
        keepalive: int = 60,
        tls_context: ssl.SSLContext | None = None,
        http: aiohttp.ClientSession | None = None,
        request_timeout: float = 10.0,
        reconnect_min: float = RECONNECT_MIN,
        reconnect_max: float = RECONNECT_MAX,
        progress_every: int = 10,
        signing_key: str | bytes | None = None,
    ) -> None:
        """Validate settings; nothing connects until `start()`.

        `tls_context` turns on TLS: connect to the server's MQTT-over-TLS port (8883 by default)
        with a context from `make_tls_context` (the pinned CA, and the device certificate and key
        for two-way TLS). The SDK's own HTTP session uses it too, so https fileUrls are checked
        against the same CA.

        `signing_key` is the server's Ed25519 public key (`publicKey` or `pem` of
        `GET /api/v1/signing-key`, see `fetch_signing_key`): with it, `download` accepts only files
        whose offer carries a valid `signature` and reports step -3 otherwise.
        Raises ValueError for a bad sign method or signing key.
        """
        if sign_method not in protocol.SIGN_METHODS:
            raise ValueError(f"sign_method must be one of {', '.join(protocol.SIGN_METHODS)}")
        self.public_key = load_public_key(signing_key) if signing_key else None
        self.host, self.port = host, port
        self.product_key, self.device_key = product_key, device_key
        self.version = version
        self.on_upgrade = on_upgrade
        self.confirm = confirm
        self.request_timeout = request_timeout
        self.progress_every = max(1, progress_every)
        self.connections = 0  # successful connects so far (1 + reconnects)
        self.deferred: list[Offer] = []
        self._secret = device_secret
        self._sign_method = sign_method
        # EnOS SDKs compute the timestamp once and reuse it on every reconnect.
        self._timestamp = str(time.time() * 1000)
        self._keepalive = keepalive
        self._tls = tls_context
        self._http = http
        self._own_http = False
        self._backoff = (reconnect_min, reconnect_max)
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._busy: Offer | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        """True while the MQTT connection is up."""
        return self._connected.is_set()

    async def start(self, timeout: float | None = 30.0) -> None:
        """Connect and keep the connection up in the background; return once connected.

        Raises LoginRefused if the first login is refused, DeviceTimeout if no connection came up
        within `timeout` (the device is stopped again in both cases). Later disconnects are retried
        forever with backoff. Calling start() on a started device raises RuntimeError; without
        aiomqtt installed (the `device` extra), ImportError.
        """
        if aiomqtt is None:
            raise ImportError("otabox.device needs aiomqtt: pip install 'otabox[device]'")
        if self._runner is not None:
            raise RuntimeError("device already started")
        self._stopped.clear()
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(first), name=f"otabox-device-{self.device_key}")
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(first)
        except TimeoutError as exc:
            await self.stop()
            raise DeviceTimeout(f"no connection to {self.host}:{self.port} within {timeout}s") from exc
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Disconnect and cancel the device's background work. Idempotent."""
        self._stopped.set()
        runner, self._runner = self._runner, None
        tasks = [*self._tasks, *([runner] if runner else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http, self._own_http = None, False

    async def stopped(self) -> None:
        """Wait until `stop()` is called (handy as the body of a device's main)."""
        await self._stopped.wait()

    async def __aenter__(self) -> Device:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected. Raises DeviceTimeout after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise DeviceTimeout("not connected") from exc

    def _mqtt_client(self) -> aiomqtt.Client:
        params = protocol.login_params(self.device_key, self.product_key, self._timestamp)
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=protocol.client_id_for(self.device_key, self._sign_method, self._timestamp),
            username=f"{self.device_key}&{self.product_key}",
            password=protocol.sign(params, self._secret, self._sign_method),
            keepalive=self._keepalive,
            timeout=self.request_timeout,
            clean_session=True,
            tls_context=self._tls,
        )

    async def _run(self, first: asyncio.Future[None]) -> None:
        delay = self._backoff[0]
        while True:
            client = self._mqtt_client()
            try:
                async with client:
                    self._on_connected(client, first)
                    delay = self._backoff[0]
                    async for message in client.messages:
                        self._dispatch(str(message.topic), _payload(message.payload))
            except aiomqtt.MqttError as exc:
                refused = isinstance(exc, aiomqtt.MqttCodeError) and _code(exc.rc) in _REFUSED_CODES
                if refused and not first.done():
                    first.set_exception(LoginRefused(f"login of {self.product_key}/{self.device_key} refused: {exc}"))
                    return
                log.info("%s: connection lost or failed (%s); retrying", self.device_key, exc)
            finally:
                self._on_lost()
            # "Equal jitter": at least half the backoff, so retries neither stampede nor stall.
            await asyncio.sleep(delay / 2 + random.uniform(0, delay / 2))
            delay = min(delay * 2, self._backoff[1])

    def _on_connected(self, client: aiomqtt.Client, first: asyncio.Future[None]) -> None:
        self._client = client
        self.connections += 1
        self._connected.set()
        if not first.done():
            first.set_result(None)
        log.info("%s connected (connection %d)", self.device_key, self.connections)
        self._spawn(self._inform_on_connect())

    def _on_lost(self) -> None:
        self._client = None
        self._connected.clear()
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(_Lost())

    async def _inform_on_connect(self) -> None:
        try:
            await self.report_version(self.version)
        except DeviceError as exc:
            log.warning("%s: version report after connect failed: %s", self.device_key, exc)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.device_key, exc_info=task.exception())

    # ------------------------------------------------------------ incoming

    def _dispatch(self, topic: str, payload: bytes) -> None:
        suffix = protocol.device_suffix(topic, self.product_key, self.device_key)
        if suffix == protocol.UPGRADE:
            self._on_push(payload)
        elif suffix is not None and suffix.endswith("_reply"):
            try:
                data = json.loads(payload)
                fut = self._replies.get(str(data.get("id")))
            except (ValueError, AttributeError):
                log.warning("%s: unreadable reply on %s", self.device_key, topic)
                return
            if fut is not None and not fut.done():
                fut.set_result(data)

    def _on_push(self, payload: bytes) -> None:
        msg_id = protocol.request_id(payload)
        try:
            offer = Offer.from_params(protocol.parse_request(payload).params)
        except (protocol.ProtocolError, OfferError) as exc:
            log.warning("%s: unusable upgrade push: %s", self.device_key, exc)
            self._spawn(self._ack(msg_id, protocol.CODE_BAD_REQUEST, str(exc)))
            return
        self._spawn(self._ack(msg_id, protocol.CODE_OK, None))
        if self._busy is not None and _same(self._busy, offer):
            return  # a redelivery of what we are already doing
        self._spawn(self.process(offer))

    async def _ack(self, msg_id: Any, code: int, message: str | None) -> None:
        client = self._client
        if client is None:
            return
        topic = protocol.topic_for(self.product_key, self.device_key, protocol.UPGRADE_REPLY)
        try:
            await client.publish(topic, protocol.reply(msg_id, code, message=message), qos=1)
        except aiomqtt.MqttError as exc:
            log.info("%s: upgrade_reply not sent: %s", self.device_key, exc)

    # ------------------------------------------------------------ offers

    async def process(self, offer: Offer) -> Decision:
        """Ask `confirm`, then run `on_upgrade`. Pushes go through here; call it for `get_offers()` results.

        Returns the Decision. An UpgradeFailed escaping on_upgrade is reported with its code
        (unless it says it was reported already), any other exception as step -1; neither is
        re-raised (they are logged). One upgrade at a time: while one runs, returns BUSY.
        """
        if self._busy is not None:
            return Decision.BUSY
        self._busy = offer
        try:
            answer = True if self.confirm is None else self.confirm(offer)
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is None:
                if offer not in self.deferred:
                    self.deferred.append(offer)
                return Decision.DEFERRED
            if offer in self.deferred:
                self.deferred.remove(offer)
            if not answer:
                await self.report_failure(FailureCode.DECLINED, f"device declined {offer.version}")
                return Decision.DECLINED
            try:
                result = self.on_upgrade(offer) if self.on_upgrade is not None else None
                if result is not None:
                    await result
            except UpgradeFailed as exc:
                log.warning("%s: upgrade to %s failed: %s", self.device_key, offer.version, exc)
                if not exc.reported:
                    await self.report_failure(exc.code, exc.desc)
            except Exception as exc:
                log.exception("%s: on_upgrade failed", self.device_key)
                await self.report_failure(FailureCode.FAILED, f"{type(exc).__name__}: {exc}")
            return Decision.ACCEPTED
        finally:
            self._busy = None

    async def get_offers(self, timeout: float | None = None) -> list[Offer]:
        """Ask the server for upgrades (getversion). Returns the offers, empty when there are none.

        Waits for a connection. Raises RequestFailed for an error reply, DeviceTimeout when no
        reply arrives within `timeout` (default `request_timeout`). Malformed offers are skipped.
        """
        reply = await self._request(protocol.GETVERSION, "ota.device.getversion", {}, timeout)
        if reply.get("code") != protocol.CODE_OK:
            raise RequestFailed(int(reply.get("code") or 0), reply.get("message"))
        offers = []
        for params in reply.get("data") or []:
            try:
                offers.append(Offer.from_params(params))
            except OfferError as exc:
                log.warning("%s: skipped an unusable offer: %s", self.device_key, exc)
        return offers

    # ------------------------------------------------------------ reports

    async def report_version(self, version: str, timeout: float | None = None) -> int:
        """Tell the server the running version (inform); also the version sent on later reconnects.

        Call it after rebooting into new firmware. Waits for a connection and the reply; returns
        the reply code (200). Raises DeviceTimeout when there is none within `timeout`.
        """
        self.version = version
        reply = await self._request(protocol.INFORM, "ota.device.inform", {"version": version}, timeout)
        return int(reply.get("code") or 0)

    async def report_progress(self, step: int, desc: str | None = None, timeout: float | None = None) -> int:
        """Report upgrade progress: `step` 0..100 percent. Returns the reply code.

        200 = recorded; 404 = the server has no active upgrade task for this device. The first
        report moves the task to upgrading. Raises ValueError for a step outside 0..100 (use
        report_failure for failures), DeviceTimeout when no reply arrives within `timeout`.
        """
        if not 0 <= step <= 100:
            raise ValueError("step must be 0..100; report failures with report_failure()")
        return await self._report(step, desc, timeout)

    async def report_failure(self, code: FailureCode | int, desc: str, timeout: float | None = None) -> int:
        """Report that the upgrade failed: `code` is a FailureCode or a device-defined value below -5.

        The server fails the task (it may retry it per the job's policy). Returns the reply code.
        Raises ValueError for a non-negative code, DeviceTimeout as report_progress does.
        """
        if int(code) >= 0:
            raise ValueError("failure codes are negative (see FailureCode)")
        return await self._report(int(code), desc, timeout)

    async def _report(self, step: int, desc: str | None, timeout: float | None) -> int:
        params: dict[str, Any] = {"step": str(step)}  # EnOS SDKs send the step as a string
        if desc:
            params["desc"] = desc
        reply = await self._request(protocol.PROGRESS, "ota.device.progress", params, timeout)
        return int(reply.get("code") or 0)

    async def _try_progress(self, step: int, desc: str) -> None:
        """Progress during a download is best effort: never wait for a connection, never fail the download."""
        if not self.connected:
            return
        try:
            await self._report(step, desc, self.request_timeout)
        except DeviceError as exc:
            log.info("%s: progress %s not reported: %s", self.device_key, step, exc)

    async def _request(self, suffix: str, method: str, params: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Publish a request and wait for its reply, re-sending after a reconnect, until `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.request_timeout if timeout is None else timeout)
        self._next_id += 1
        msg_id = f"{self._next_id}"
        payload = protocol.request(msg_id, method, params)
        topic = protocol.topic_for(self.product_key, self.device_key, suffix)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._connected.wait()
                        client = self._client
                        if client is None:
                            continue
                        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
                        self._replies[msg_id] = fut
                        await client.publish(topic, payload, qos=1)
                        return await fut
                except (_Lost, aiomqtt.MqttError) as exc:
                    task = asyncio.current_task()
                    if self._stopped.is_set() or (task is not None and task.cancelling()):
                        # asyncio.wait_for (inside aiomqtt, Python 3.11) can swallow a cancellation that
                        # races a PUBACK; the stop must still win.
                        raise asyncio.CancelledError from exc
                    if isinstance(exc, _Lost):
                        continue  # the connection dropped: send again once it is back (the server is idempotent)
                    log.info("%s: %s not sent (%s); retrying", self.device_key, suffix, exc)
                    await asyncio.sleep(0.1)  # the run loop notices the dead connection; don't spin meanwhile
        except TimeoutError as exc:
            raise DeviceTimeout(f"no reply to {suffix} within the timeout") from exc
        finally:
            fut_left = self._replies.pop(msg_id, None)
            if fut_left is not None and fut_left.done() and not fut_left.cancelled():
                fut_left.exception()  # retrieved, so asyncio does not warn about a late _Lost

    # ------------------------------------------------------------ download

    async def download(
        self,
        offer: Offer,
        path: str | os.PathLike[str],
        *,
        span: tuple[int, int] = (0, 80),
        running_image: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Download the offer's file to `path`, resuming with Range, and verify size and sign.

        With `running_image` (the image this device runs) and an offer that carries a `delta`
        from this device's version, only the delta is downloaded and applied to it; the rebuilt
        image must match the full image's size and sign (and signature). Any failure of that
        path (download, format, apply, check) falls back to the full download. The final
        progress `desc` says which path was taken.

        Writes `<path>.part` first (a later call resumes it) and renames it to `path` only once
        `fileSize` and `sign` match (and, with a `signing_key`, the Ed25519 `signature`).
        Reports progress every `progress_every` percent of the file,
        scaled into the steps `span` (default 0..80, leaving room for flashing). Network errors are
        retried DOWNLOAD_ATTEMPTS times, each resuming where the last stopped. Returns `path`.
        Raises DownloadFailed (step -2 reported) or VerificationFailed (step -3 reported; the bad
        file is deleted).
        """
        session = await self._session()
        lo, hi = span
        target = Path(path)
        checked = "size, digest and signature" if self.public_key else "size and digest"

        def on_percent(pct: int) -> Awaitable[None]:
            return self._try_progress(lo + (hi - lo) * pct // 100, f"downloaded {pct}%")

        await self._try_progress(lo, "downloading")
        fallback = ""
        if running_image is not None and offer.delta is not None:
            try:
                await self._apply_delta(session, offer, offer.delta, Path(running_image), target, on_percent)
            except (DownloadError, VerifyError, DeltaError, OSError) as exc:
                log.warning(
                    "%s: delta from %s not used, downloading the full image: %s",
                    self.device_key,
                    offer.delta.source,
                    exc,
                )
                fallback = f"delta failed ({exc}); "
            else:
                size = offer.delta.offer.file_size
                await self._try_progress(
                    hi, f"rebuilt from a delta of {size} bytes from {offer.delta.source}; {checked} verified"
                )
                return target
        try:
            result = await to_file(
                session,
                offer,
                target,
                on_percent=on_percent,
                every=self.progress_every,
                attempts=DOWNLOAD_ATTEMPTS,
                retry_delay=DOWNLOAD_RETRY_DELAY,
                public_key=self.public_key,
            )
        except DownloadError as exc:
            await self.report_failure(FailureCode.DOWNLOAD, str(exc))
            raise DownloadFailed(str(exc), reported=True) from exc
        except VerifyError as exc:
            await self.report_failure(FailureCode.VERIFY, str(exc))
            raise VerificationFailed(str(exc), reported=True) from exc
        await self._try_progress(hi, f"{fallback}downloaded the full image; {checked} verified")
        return result

    async def _apply_delta(
        self,
        session: aiohttp.ClientSession,
        offer: Offer,
        patch: DeltaOffer,
        running: Path,
        target: Path,
        on_percent: Callable[[int], Awaitable[None]],
    ) -> None:
        """Download `patch`, apply it to `running` and check the result as the full image."""
        if patch.source != self.version:
            raise DeltaError(f"the delta is from {patch.source}, this device runs {self.version}")
        if patch.algorithm not in deltas.FORMATS:
            raise DeltaError(f"unknown delta algorithm {patch.algorithm!r}")
        patch_file = target.with_name(target.name + ".delta")
        rebuilt = target.with_name(target.name + ".part")
        try:
            await to_file(
                session,
                patch.offer,
                patch_file,
                on_percent=on_percent,
                every=self.progress_every,
                attempts=DOWNLOAD_ATTEMPTS,
                retry_delay=DOWNLOAD_RETRY_DELAY,
            )
            await asyncio.to_thread(deltas.apply, running, patch_file, rebuilt, patch.algorithm)
            await asyncio.to_thread(check_file, offer, rebuilt, self.public_key)
        except BaseException:
            rebuilt.unlink(missing_ok=True)
            raise
        finally:
            patch_file.unlink(missing_ok=True)
        os.replace(rebuilt, target)

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # With TLS, https fileUrls are verified against the same pinned CA as MQTT.
            connector = aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=30)
            )
            self._own_http = True
        return self._http


def _payload(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def _code(rc: Any) -> int:
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else -1


def _same(a: Offer, b: Offer) -> bool:
    return (a.job_id, a.version, a.sign) == (b.job_id, b.version, b.sign)


async def fetch_signing_key(base_url: str, session: aiohttp.ClientSession | None = None) -> str:
    """The server's Ed25519 public key (base64) from `{base_url}/api/v1/signing-key` (no token needed).

    Fetch it once, when the device is provisioned, and keep it: a device that fetches the key at
    every upgrade trusts whoever answers. Raises aiohttp.ClientError (404: the server does not sign).
    """
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.get(base_url.rstrip("/") + "/api/v1/signing-key", raise_for_status=True) as resp:
            data = await resp.json()
            return str(data["publicKey"])
    finally:
        if own:
            await http.close()

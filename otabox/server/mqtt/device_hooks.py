"""What the broker asks of the server: MQTT login against the registry, presence, device messages.

`DeviceGateway` implements `broker.DeviceHooks`. Job-related messages (progress, getversion,
upgrade_reply, and the task side of inform) go to the job engine's `JobHooks`; replies go out
through the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from otabox import protocol
from otabox.server.keys import Keys
from otabox.server.mqtt.broker import REFUSED_BAD_CREDENTIALS, REFUSED_NOT_AUTHORIZED, LoginResult
from otabox.server.store import Store
from otabox.server.store.registry import Credentials
from otabox.server.throttle import LoginLimiter

log = logging.getLogger(__name__)

# An address may fail this many times the per-(device, address) limit before it is locked out.
ADDRESS_FACTOR = 10
# Delay of a wrong login for a device with more recent failures than the limit: a step per
# failure over it, at most MAX_TARPIT seconds.
TARPIT_STEP = 0.1
MAX_TARPIT = 2.0


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """What a device's login is checked against: its secret in clear and its record."""

    secret: str
    record: Credentials

    @property
    def auth(self) -> str:
        return self.record.auth


class Sender(Protocol):
    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool: ...

    async def disconnect(self, product_key: str, device_key: str) -> bool: ...


class JobHooks(Protocol):
    """What the job engine needs to hear from devices (implemented by the scheduler)."""

    async def on_connected(self, product_key: str, device_key: str) -> None: ...

    async def on_inform(self, product_key: str, device_key: str, version: str) -> None: ...

    async def on_progress(self, product_key: str, device_key: str, step: int, desc: str | None) -> int: ...

    async def offers(self, product_key: str, device_key: str) -> list[dict[str, Any]]: ...

    async def on_upgrade_reply(self, product_key: str, device_key: str, code: int, message: str | None) -> None: ...


class DeviceGateway:
    """Broker hooks: login, presence and the device -> server OTA topics."""

    def __init__(
        self,
        store: Store,
        keys: Keys,
        limiter: LoginLimiter,
        jobs: JobHooks,
        sender: Sender,
        last_seen_interval: float = 30.0,
    ) -> None:
        self.store = store
        self.keys = keys
        self.limiter = limiter
        self.jobs = jobs
        self.sender = sender
        self.last_seen_interval = last_seen_interval
        self._last_seen: dict[tuple[str, str], float] = {}
        self._secrets: dict[tuple[str, str], KnownDevice] = {}

    # ------------------------------------------------------------ login

    async def authenticate(
        self, client_id: str | None, username: str | None, password: str | None, address: str
    ) -> LoginResult:
        try:
            login = protocol.parse_login(client_id, username)
        except protocol.ProtocolError as exc:
            log.warning("login refused from %s: %s (username %r)", address, exc, username)
            self.limiter.fail("addr:" + address)
            return REFUSED_BAD_CREDENTIALS
        who = f"{login.product_key}/{login.device_key}"
        # Lockouts are per (device, address) and per address, never per device alone: whoever
        # knows a device key could otherwise keep that device offline from anywhere. An address
        # is allowed more (devices behind one NAT share it).
        dev_key, pair_key, addr_key = "dev:" + who, f"pair:{who}@{address}", "addr:" + address
        if self.limiter.locked(pair_key) or self.limiter.locked(addr_key, limit=self.limiter.limit * ADDRESS_FACTOR):
            log.warning("login refused for %s from %s: too many failed logins, locked out", who, address)
            return REFUSED_NOT_AUTHORIZED
        creds = await self._credentials(login.product_key, login.device_key)
        ok = False
        reason = "unknown device"
        if creds is not None:
            try:
                ok = protocol.check_password(login, password or "", creds.secret, creds.auth)
                reason = "bad signature or client id"
            except protocol.ProtocolError as exc:
                reason = str(exc)
        if not ok:
            log.warning("login refused for %s from %s: %s", who, address, reason)
            self.limiter.fail(dev_key, pair_key, addr_key)
            # Guesses spread over many addresses are slowed, not locked out: each wrong answer
            # for a device under attack comes later, the right one at once.
            over = self.limiter.count(dev_key) - self.limiter.limit
            if over > 0:
                await asyncio.sleep(min(MAX_TARPIT, TARPIT_STEP * over))
            return REFUSED_BAD_CREDENTIALS
        self.limiter.clear(pair_key)
        return LoginResult(login.product_key, login.device_key)

    async def _credentials(self, pk: str, dk: str) -> KnownDevice | None:
        """A device's login record with its secret decrypted; read once, then kept until `forget`
        (a new secret, a deletion, a change of its identity rules)."""
        key = (pk, dk)
        cached = self._secrets.get(key)
        if cached is None:
            creds = await self.store.device_credentials(pk, dk)
            if creds is None:
                return None
            cached = self._secrets[key] = KnownDevice(self.keys.decrypt(creds.secret_enc), creds)
        return cached

    async def forget(self, product_key: str, device_key: str) -> None:
        """The device was deleted or got a new secret: drop what is cached and end its connection,
        so the old secret logs in no more (implements `registry.DeviceSessions`)."""
        self._secrets.pop((product_key, device_key), None)
        self._last_seen.pop((product_key, device_key), None)
        if await self.sender.disconnect(product_key, device_key):
            log.info("device %s/%s disconnected: deleted or its secret changed", product_key, device_key)

    # ------------------------------------------------------------ presence

    async def device_connected(self, product_key: str, device_key: str) -> None:
        self._last_seen[(product_key, device_key)] = time.time()  # written just below
        await self.store.set_device_online(product_key, device_key, True)
        log.info("device %s/%s online", product_key, device_key)
        await self.jobs.on_connected(product_key, device_key)

    async def device_disconnected(self, product_key: str, device_key: str) -> None:
        self._last_seen.pop((product_key, device_key), None)
        await self.store.set_device_online(product_key, device_key, False)
        log.info("device %s/%s offline", product_key, device_key)

    # ------------------------------------------------------------ messages

    def _reply(self, pk: str, dk: str, suffix: str, payload: bytes) -> None:
        self.sender.deliver(pk, dk, suffix + "_reply", payload, qos=0)

    async def _heard(self, product_key: str, device_key: str) -> None:
        # lastSeen follows a device while it talks, one write per last_seen_interval at most:
        # a progress report every second must not become a database write every second.
        now = time.time()
        key = (product_key, device_key)
        if now - self._last_seen.get(key, 0.0) >= self.last_seen_interval:
            self._last_seen[key] = now
            await self.store.touch_device(product_key, device_key, now)

    async def device_message(self, product_key: str, device_key: str, suffix: str, payload: bytes) -> None:
        if suffix == protocol.INFORM:
            self._last_seen[(product_key, device_key)] = time.time()  # written with the version
        else:
            await self._heard(product_key, device_key)
        if suffix == protocol.UPGRADE_REPLY:
            await self._upgrade_reply(product_key, device_key, payload)
            return
        try:
            req = protocol.parse_request(payload)
            data: Any = None
            code = protocol.CODE_OK
            if suffix == protocol.INFORM:
                version = protocol.parse_version(req.params)
                await self.store.set_device_version(product_key, device_key, version)
                await self.jobs.on_inform(product_key, device_key, version)
            elif suffix == protocol.PROGRESS:
                progress = protocol.parse_progress(req.params)
                code = await self.jobs.on_progress(product_key, device_key, progress.step, progress.desc)
            elif suffix in (protocol.GETVERSION, protocol.REQUEST):
                data = await self.jobs.offers(product_key, device_key)
        except protocol.ProtocolError as exc:
            log.warning("malformed %s from %s/%s: %s", suffix, product_key, device_key, exc)
            self._reply(
                product_key,
                device_key,
                suffix,
                protocol.reply(protocol.request_id(payload), protocol.CODE_BAD_REQUEST, message=str(exc)),
            )
            return
        except Exception:
            log.exception("failed to handle %s from %s/%s", suffix, product_key, device_key)
            self._reply(
                product_key,
                device_key,
                suffix,
                protocol.reply(protocol.request_id(payload), protocol.CODE_INTERNAL, message="internal error"),
            )
            return
        message = "no active upgrade task" if code == protocol.CODE_NOT_FOUND else None
        self._reply(product_key, device_key, suffix, protocol.reply(req.id, code, data, message))

    async def _upgrade_reply(self, product_key: str, device_key: str, payload: bytes) -> None:
        # upgrade_reply is itself a reply: never answered, malformed ones only logged.
        try:
            code, message = protocol.reply_code(payload)
        except protocol.ProtocolError as exc:
            log.warning("malformed upgrade_reply from %s/%s: %s", product_key, device_key, exc)
            return
        await self.jobs.on_upgrade_reply(product_key, device_key, code, message)

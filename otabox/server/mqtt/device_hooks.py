"""What the broker asks of the server: MQTT login against the registry, presence, device messages.

`DeviceGateway` implements `broker.DeviceHooks`. Job-related messages (progress, getversion,
upgrade_reply, and the task side of inform) go to the job engine's `JobHooks`; replies go out
through the outbox.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from otabox import protocol
from otabox.server import pki
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

    def deliver_to(self, product_key: str, device_key: str, topic: str, payload: bytes, qos: int = 1) -> bool: ...

    async def disconnect(self, product_key: str, device_key: str, certificate: str | None = None) -> bool: ...


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
        self._online: set[tuple[str, str]] = set()  # connected here and shown online (not provisioning)
        self._secrets: dict[tuple[str, str], KnownDevice] = {}
        # Devices just logged in with the product secret, owed their device secret once served.
        self._activating: set[tuple[str, str]] = set()

    # ------------------------------------------------------------ login

    async def authenticate(
        self,
        client_id: str | None,
        username: str | None,
        password: str | None,
        address: str,
        certificate: bytes | None = None,
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
        known = await self._credentials(login.product_key, login.device_key)
        refused = await self._refusal(login, password or "", known, certificate)
        if refused is not None:
            reason, code = refused
            log.warning("login refused for %s from %s: %s", who, address, reason)
            self.limiter.fail(dev_key, pair_key, addr_key)
            # Guesses spread over many addresses are slowed, not locked out: each wrong answer
            # for a device under attack comes later, the right one at once.
            over = self.limiter.count(dev_key) - self.limiter.limit
            if over > 0:
                await asyncio.sleep(min(MAX_TARPIT, TARPIT_STEP * over))
            return code
        assert known is not None
        self.limiter.clear(pair_key)
        key = (login.product_key, login.device_key)
        if login.secure_mode == protocol.MODE_PRODUCT_SECRET:
            self._activating.add(key)  # its secret goes out once the connection is served
        elif known.record.dynamic_activation and not known.record.activated:
            # It logs in with its own secret: it has it, so the product secret may no longer stand in.
            await self._activated(*key)
        serial = pki.certificate_serial(certificate) if certificate is not None else ""
        return LoginResult(login.product_key, login.device_key, certificate=serial)

    async def _refusal(
        self, login: protocol.LoginRequest, password: str, known: KnownDevice | None, certificate: bytes | None
    ) -> tuple[str, LoginResult] | None:
        """Why this login is refused (and the CONNACK for it), or None when it may go on."""
        if known is None:
            return "unknown device", REFUSED_BAD_CREDENTIALS
        if login.secure_mode == protocol.MODE_PRODUCT_SECRET:
            if not known.record.dynamic_activation:
                return "secure mode 3 but its product has no dynamic activation", REFUSED_NOT_AUTHORIZED
            if known.record.activated:
                return "secure mode 3 but the device is activated already", REFUSED_NOT_AUTHORIZED
            secret_enc = await self.store.product_secret(login.product_key)
            if secret_enc is None:
                return "secure mode 3 but its product has no dynamic activation", REFUSED_NOT_AUTHORIZED
            secret, mode, auth = self.keys.decrypt(secret_enc), protocol.MODE_PRODUCT_SECRET, "sign"
        else:
            secret, mode, auth = known.secret, protocol.MODE_DEVICE_SECRET, known.auth
        try:
            if not protocol.check_password(login, password, secret, auth, mode):
                return "bad signature or client id", REFUSED_BAD_CREDENTIALS
        except protocol.ProtocolError as exc:
            return str(exc), REFUSED_BAD_CREDENTIALS
        if certificate is not None:
            why = await self._certificate_refusal(login, certificate)
            if why is not None:
                return why, REFUSED_NOT_AUTHORIZED
        elif known.record.require_certificate:
            return "the device may log in only with its certificate", REFUSED_NOT_AUTHORIZED
        return None

    async def _certificate_refusal(self, login: protocol.LoginRequest, der: bytes) -> str | None:
        # The handshake verified the chain to otabox's CA; who the certificate belongs to and
        # whether it still counts is the store's record of its serial.
        try:
            serial = pki.certificate_serial(der)
        except ValueError:
            return "unreadable client certificate"
        cert = await self.store.get_certificate(serial)
        if cert is None:
            return f"certificate {serial} is not one otabox issued"
        if cert.revoked_at is not None:
            return f"certificate {serial} is revoked"
        if (cert.product_key, cert.device_key) != (login.product_key, login.device_key):
            return f"certificate {serial} belongs to {cert.product_key}/{cert.device_key}"
        return None

    async def _credentials(self, pk: str, dk: str) -> KnownDevice | None:
        """A device's login record with its secret decrypted; read once, then kept until `forget`
        (a new secret, a deletion, a change of its identity rules)."""
        key = (pk, dk)
        cached = self._secrets.get(key)
        if cached is None:
            creds = await self.store.device_credentials(pk, dk)
            if creds is None:
                return None
            # Kept: the secret in clear and the rules, not the encrypted secret a second time
            # (~150 bytes a device); the auth method's few names shared by every device.
            record = dataclasses.replace(creds, secret_enc="", auth=sys.intern(creds.auth))
            cached = self._secrets[key] = KnownDevice(self.keys.decrypt(creds.secret_enc), record)
        return cached

    async def _activated(self, pk: str, dk: str) -> None:
        if await self.store.mark_activated(pk, dk):
            log.info("device %s/%s activated: secure mode 3 is refused for it from now on", pk, dk)
        self._secrets.pop((pk, dk), None)

    def _send_activation(self, pk: str, dk: str) -> None:
        known = self._secrets.get((pk, dk))
        if known is None:
            return
        payload = protocol.activation(uuid.uuid4().hex, pk, dk, known.secret)
        if self.sender.deliver_to(pk, dk, protocol.session_topic(pk, dk, protocol.ACTIVATE_INFO), payload):
            log.info("device %s/%s logged in with the product secret; its device secret was sent", pk, dk)

    async def forget(self, product_key: str, device_key: str) -> None:
        """The device was deleted or got a new secret: drop what is cached and end its connection,
        so the old secret logs in no more (implements `registry.DeviceSessions`)."""
        self._secrets.pop((product_key, device_key), None)
        self._last_seen.pop((product_key, device_key), None)
        if await self.sender.disconnect(product_key, device_key):
            log.info("device %s/%s disconnected: deleted or its secret changed", product_key, device_key)

    async def require_certificate(self, product_key: str, device_key: str, required: bool) -> None:
        """Its rules changed: read them again at its next login; when a certificate is required, a
        connection made without one ends (implements `registry.DeviceSessions`)."""
        self._secrets.pop((product_key, device_key), None)
        if required and await self.sender.disconnect(product_key, device_key, certificate=""):
            log.info("device %s/%s disconnected: it now needs a certificate to log in", product_key, device_key)

    async def product_changed(self, product_key: str) -> None:
        """Its dynamic activation was turned on or off: its devices' cached records say otherwise
        (implements `registry.DeviceSessions`)."""
        for key in [k for k in self._secrets if k[0] == product_key]:
            del self._secrets[key]

    async def certificate_revoked(self, product_key: str, device_key: str, serial: str) -> None:
        """Close the device's live connection if it logged in with this certificate
        (implements `registry.DeviceSessions`)."""
        if await self.sender.disconnect(product_key, device_key, certificate=serial):
            log.info("device %s/%s disconnected: its certificate %s was revoked", product_key, device_key, serial)

    # ------------------------------------------------------------ presence

    async def device_connected(self, product_key: str, device_key: str) -> None:
        self._last_seen[(product_key, device_key)] = time.time()  # written just below
        if (product_key, device_key) in self._activating:
            # A provisioning session: the device fetches its secret and comes back with secure
            # mode 2. It is not online for upgrades meanwhile; a push here would reach a client
            # that has no upgrade handler yet (the stock SDK answers it with an error).
            self._activating.discard((product_key, device_key))
            self._send_activation(product_key, device_key)
            log.info("device %s/%s connected to be activated", product_key, device_key)
            return
        self._online.add((product_key, device_key))
        await self.store.set_device_online(product_key, device_key, True)
        log.info("device %s/%s online", product_key, device_key)
        await self.jobs.on_connected(product_key, device_key)

    def online_here(self) -> set[tuple[str, str]]:
        """The devices connected to this node and shown online (implements `nodes.Presence`)."""
        return set(self._online)

    async def device_disconnected(self, product_key: str, device_key: str) -> None:
        self._last_seen.pop((product_key, device_key), None)
        self._online.discard((product_key, device_key))
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
        if suffix == protocol.ACTIVATE_REPLY:
            await self._activate_reply(product_key, device_key, payload)
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

    async def _activate_reply(self, product_key: str, device_key: str, payload: bytes) -> None:
        # A reply too: never answered. Until a device says it has its secret (or logs in with
        # it), it may come back with the product secret and be sent the secret again.
        try:
            code, message = protocol.reply_code(payload)
        except protocol.ProtocolError as exc:
            log.warning("malformed activation reply from %s/%s: %s", product_key, device_key, exc)
            return
        if code != protocol.CODE_OK:
            log.warning(
                "device %s/%s did not take its secret: code %s %s", product_key, device_key, code, message or ""
            )
            return
        await self._activated(product_key, device_key)

    async def _upgrade_reply(self, product_key: str, device_key: str, payload: bytes) -> None:
        # upgrade_reply is itself a reply: never answered, malformed ones only logged.
        try:
            code, message = protocol.reply_code(payload)
        except protocol.ProtocolError as exc:
            log.warning("malformed upgrade_reply from %s/%s: %s", product_key, device_key, exc)
            return
        await self.jobs.on_upgrade_reply(product_key, device_key, code, message)

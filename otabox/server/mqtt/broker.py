"""The embedded MQTT broker: amqtt 0.12.1 with its connection lifecycle and routing replaced.

Every override below names the amqtt behaviour it replaces. amqtt is pinned exactly
(pyproject.toml) because these methods reach into its internals. What we change:

- `_client_connected`: authenticate *before* a session is looked up, created or taken
  over (stock touched the live session first, so a wrong password could wipe it, defect a);
  a CONNECT must arrive within `connect_timeout` (stock waited forever, defect d); a
  previous clean session is never resumed by a clean_session=0 reconnect (stock kept the
  old clean flag, defect c); the CONNECT is read whole within `max_packet` bytes, and one
  of another protocol level (MQTT 5) gets CONNACK 1 "unacceptable protocol version" at once
  (stock failed to parse it and left the client waiting); the client id is replaced by the
  canonical `{pk}/{dk}` so one device has one session whatever timestamp its client id carries.
- `_message_loop` (replacing `_client_message_loop` and `_handle_message_delivery`): a
  PUBLISH to a `$`, wildcard or foreign topic is dropped and logged and the client is
  served on (stock stopped serving the client but left its session "connected", defect e);
  device messages go to the application hooks instead of the broadcast queue (which scans
  every subscription per message). One lasting task per connection instead of five, its
  reader: what it reads for the broker goes into the handler's inbox, which a short-lived
  task works through while it has items (see connection.py, which also replaces the
  per-session state machine, the reader loop and the queues amqtt made per connection).
- `add_subscription` / `_del_all_subscriptions` / `_del_subscription`: topic ACL and a
  per-session filter index (stock removed a session's subscriptions by scanning all).
- Delivery: server -> device messages go straight to the device's handler in O(1) through
  `outbox.Outbox` (the device does not need to subscribe; EnOS SDKs never do).
- The message loop no longer logs `repr(self._subscriptions)` on every SUBSCRIBE.
- Keep-alive: a client silent for 1.5 x its keep-alive is disconnected (stock's broker
  handler ignored read timeouts, so half-open connections stayed "online" forever).
- Retained messages are not kept (stock kept every one in memory, without bound, even after
  the device left); a PUBLISH with the retain flag is handled as a plain one.
- Packets over `max_packet` bytes are refused from their fixed header, before a byte of the
  body is read (stock read any size); a malformed packet closes the connection with one INFO
  line (stock logged a traceback per packet), and so does a SUBSCRIBE without a filter.
- A second listener for MQTT over TLS (`tls`): the handshake runs in the connection's own task
  under `connect_timeout` (a failed one, a plain-text client included, is one INFO line and a
  closed socket; asyncio's own TLS server logs nothing and has no such deadline), then the
  connection is served as on the plain listener, with the client certificate (if any) handed
  to `authenticate`.
- `max_connections`: a connection over the cap is closed before anything is read from it (stock's
  listener `max_connections` makes it wait, holding its descriptor), so the node keeps
  descriptors for its database, downloads and files.
- Will messages of devices are not published (devices may only use their own topics and
  nobody else subscribes to them); stock broadcast them.

Plugins: the broker is configured with no amqtt plugins at all; authentication and ACL are
the methods here, so nothing depends on amqtt's plugin semantics (where a topic plugin
returning None denies, and event hooks are fire-and-forget tasks that swallow exceptions).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from asyncio import sslproto
from collections.abc import Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.codecs_amqtt import decode_packet_id, decode_string, read_or_raise
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.publish import PublishVariableHeader
from amqtt.session import Session

from otabox import protocol
from otabox.server.mqtt.connection import Closed, Handler, LightSession, release_socket
from otabox.server.mqtt.outbox import Outbox, publish, session_key

log = logging.getLogger(__name__)

SUBSCRIBE_REFUSED = 0x80
# Pending connections the kernel queues for us (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096
# Seconds between two warnings about connections refused at `max_connections`.
REFUSAL_REPORT_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class LoginResult:
    """Outcome of a device login: the device's identity, or the CONNACK code refusing it."""

    product_key: str = ""
    device_key: str = ""
    refuse_code: int = 0  # 0 = accepted; else BAD_USERNAME_PASSWORD or NOT_AUTHORIZED
    certificate: str = ""  # serial of the device certificate it logged in with, if any


REFUSED_BAD_CREDENTIALS = LoginResult(refuse_code=BAD_USERNAME_PASSWORD)
REFUSED_NOT_AUTHORIZED = LoginResult(refuse_code=NOT_AUTHORIZED)


class DeviceHooks(Protocol):
    """What the application supplies to the broker."""

    async def authenticate(
        self,
        client_id: str | None,
        username: str | None,
        password: str | None,
        address: str,
        certificate: bytes | None = None,
    ) -> LoginResult:
        """`certificate`: the DER client certificate presented on the TLS listener (its chain to
        the device CA already verified by the handshake)."""
        ...

    async def device_connected(self, product_key: str, device_key: str) -> None: ...

    async def device_disconnected(self, product_key: str, device_key: str) -> None: ...

    async def device_message(self, product_key: str, device_key: str, suffix: str, payload: bytes) -> None: ...


async def _read_publish_header(
    cls: type[PublishVariableHeader], reader: ReaderAdapter | asyncio.StreamReader, fixed_header: MQTTFixedHeader
) -> PublishVariableHeader:
    """Replaces PublishVariableHeader.from_stream (class-wide, this process only).

    Stock raises on a wildcard topic *before* the payload is read, and its reader loop
    then parses the payload bytes as packets (garbage, a desynchronised stream). We read
    the whole packet first, so the bad PUBLISH is dropped and the stream stays in step.
    """
    topic = await decode_string(reader)
    has_qos = (fixed_header.flags >> 1) & 0x03
    packet_id = await decode_packet_id(reader) if has_qos else None
    if "#" in topic or "+" in topic:
        rest = fixed_header.remaining_length - 2 - len(topic.encode()) - (2 if has_qos else 0)
        if rest > 0:
            await read_or_raise(reader, rest)
        log.warning("dropped PUBLISH to wildcard topic %r", topic)
        raise MQTTError("[MQTT-3.3.2-2] wildcard in PUBLISH topic")
    return cls(topic, packet_id)


# A deliberate monkeypatch of amqtt's classmethod (same call signature), hence the ignore.
PublishVariableHeader.from_stream = classmethod(_read_publish_header)  # type: ignore[method-assign, assignment]


# asyncio allocates (and zeroes) a read buffer of SSLProtocol.max_size, 256 KiB, for every TLS
# connection: 2.5 GB for 10,000 devices doing nothing (bench/RESULTS.md). A TLS record is at most
# 16 KiB; a smaller buffer only means more reads of a large upload. Process-wide (HTTPS too), on
# purpose; the SDK's small_tls_buffers() does the same for device processes.
TLS_READ_BUFFER = 16 * 1024
sslproto.SSLProtocol.max_size = TLS_READ_BUFFER

_background: set[asyncio.Task[Any]] = set()


def _keep(task: asyncio.Task[Any]) -> None:
    """Hold a reference to a fire-and-forget task and log its failure (never swallow it)."""
    _background.add(task)
    task.add_done_callback(_done)


def _done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())


class OtaBroker(Broker):
    """amqtt Broker bound to otabox's device registry through `DeviceHooks`."""

    def __init__(
        self,
        hooks: DeviceHooks,
        outbox: Outbox,
        host: str,
        port: int | None,
        connect_timeout: float,
        max_packet: int,
        max_connections: int = 0,
        tls: ssl.SSLContext | None = None,
        tls_port: int | None = None,
    ) -> None:
        """`port` None: no plain listener; `tls` with `tls_port`: the MQTT-over-TLS listener;
        `max_connections` 0: no cap."""
        # amqtt needs a "default" listener; without a bind it starts none (plain MQTT off).
        bind = f"{host}:{port}" if port is not None else None
        config = {
            "listeners": {"default": {"type": "tcp", "bind": bind, "max_connections": -1}},
            # An empty dict (not None) means "load no plugins" (None would load entry points).
            "plugins": {},
        }
        super().__init__(config)
        self.hooks = hooks
        self.outbox = outbox
        self.connect_timeout = connect_timeout
        self.max_packet = max_packet
        self.max_connections = max_connections
        self.connections_refused = 0  # at the cap (also read by tests)
        self._refusals_reported = 0
        self._refusal_reported_at = 0.0
        self.host = host
        self.tls = tls
        self._tls_port = tls_port
        self.tls_handshake_failures = 0
        # Read by /metrics (otabox.server.metrics).
        self.logins_accepted = 0
        self.logins_refused = 0
        self.messages_in = 0
        self._identity: dict[str, tuple[str, str]] = {}  # session key -> (pk, dk)
        self._session_filters: dict[str, dict[str, int]] = {}  # session key -> {filter: qos}
        self._served: dict[str, Handler] = {}  # session key -> the handler of its live connection
        self._closing = False

    async def _create_server_instance(
        self, listener_name: str, listener_type: Any, address: str | None, port: int, ssl_context: Any
    ) -> Any:
        # Replaces the stock TCP listener, which used asyncio's default backlog of 100: in a
        # connect storm the kernel dropped SYNs and clients waited 1-3 s for retransmits.
        if listener_type == ListenerType.TCP:
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name),
                address,
                port,
                reuse_address=True,
                ssl=ssl_context,
                backlog=LISTEN_BACKLOG,
            )
        return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)

    async def _start_listeners(self) -> None:
        await super()._start_listeners()
        if self.tls is not None and self._tls_port is not None:
            # Not an amqtt listener: its config would copy "default"'s settings into this one
            # and wrap the socket in TLS before we could time or log the handshake.
            instance = await asyncio.start_server(
                self._tls_connected, self.host, self._tls_port, reuse_address=True, backlog=LISTEN_BACKLOG
            )
            self._servers["tls"] = Server("tls", instance, -1)

    def _bound_port(self, listener: str) -> int | None:
        entry = self._servers.get(listener)
        if entry is None:
            return None
        # Our listeners are TCP (_create_server_instance), never amqtt's websockets or external one.
        assert isinstance(entry.instance, asyncio.Server)
        return int(entry.instance.sockets[0].getsockname()[1])

    @property
    def port(self) -> int | None:
        """The plain MQTT port, None when that listener is off."""
        return self._bound_port("default")

    @property
    def tls_port(self) -> int | None:
        """The MQTT-over-TLS port, None when TLS is off."""
        return self._bound_port("tls")

    async def _tls_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.tls is not None
        peer = writer.get_extra_info("peername")
        address = peer[0] if peer else "?"
        try:
            # One deadline for the handshake and (in _serve) the CONNECT after it.
            async with asyncio.timeout(self.connect_timeout):
                await writer.start_tls(self.tls)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.tls_handshake_failures += 1
            # A plain-text MQTT client shows as "wrong version number", an unknown CA as
            # "certificate unknown"/"unknown ca": worth one line, never a traceback.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.info("TLS handshake with %s failed: %s", address, reason)
            writer.transport.abort()
            return
        await self.stream_connected(reader, writer, listener_name="tls")

    # ------------------------------------------------------------ connections

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        # Replaces amqtt's _client_connected/_initialize_client_session/_handle_client_session.
        server = self._servers.get(listener_name)
        if server is None:
            await writer.close()
            return
        if self.max_connections and sum(s.conn_count for s in self._servers.values()) >= self.max_connections:
            self._refuse(writer)
            return
        await server.acquire_connection()
        handed_over = False
        try:
            handed_over = await self._serve(reader, writer, server)
        except (AMQTTError, MQTTError, NoDataError, ConnectionError) as exc:
            log.info("connection ended: %r", exc)
        except Exception:
            log.exception("unexpected error serving an MQTT connection")
        finally:
            if not handed_over:  # else _finish does this when the connection ends
                release_socket(writer)  # however the connection ended
                server.release_connection()

    def _refuse(self, writer: WriterAdapter) -> None:
        """Close a connection over the cap at once, before reading anything: its descriptor is
        given back, and the device's client retries later or elsewhere (another node)."""
        release_socket(writer)
        self.connections_refused += 1
        now = time.monotonic()
        if now - self._refusal_reported_at >= REFUSAL_REPORT_EVERY:
            log.warning(
                "%d MQTT connection(s) refused: %d open, mqtt_max_connections %d (add a node, or raise the"
                " open files limit: LimitNOFILE=)",
                self.connections_refused - self._refusals_reported,
                sum(s.conn_count for s in self._servers.values()),
                self.max_connections,
            )
            self._refusals_reported, self._refusal_reported_at = self.connections_refused, now

    async def _serve(self, reader: ReaderAdapter, writer: WriterAdapter, server: Server) -> bool:
        """Log the client in and set its connection up; True once it is handed over to its
        handler's inbox (this task then ends: an idle connection keeps only its reader task)."""
        peer = writer.get_peer_info()
        address = peer[0] if peer else "?"
        try:
            async with asyncio.timeout(self.connect_timeout):
                connected = await Handler.read_connect(reader, writer, self.plugins_manager, self.max_packet)
        except TimeoutError:
            log.warning("no CONNECT from %s within %.1fs; closing", address, self.connect_timeout)
            await writer.close()
            return False
        except (AMQTTError, MQTTError, NoDataError) as exc:
            log.warning("bad CONNECT from %s: %s", address, exc)
            await writer.close()
            return False
        if connected is None:
            return False  # refused by protocol rules; CONNACK already sent
        handler, incoming = connected

        tls = writer.get_ssl_info()
        certificate = tls.getpeercert(binary_form=True) if tls is not None else None
        result = await self.hooks.authenticate(
            incoming.client_id, incoming.username, incoming.password, address, certificate
        )
        # Not kept once checked (stock kept it in the session for the connection's life): a
        # credential in memory, and ~100 bytes of it per connection.
        incoming.password = None
        if result.refuse_code:
            self.logins_refused += 1
            # Refused before any session is touched: a live session with this id is unaffected.
            await ConnackPacket.build(0, result.refuse_code).to_stream(writer)
            await writer.close()
            return False

        self.logins_accepted += 1
        pk, dk = result.product_key, result.device_key
        key = session_key(pk, dk)
        await self._take_over(key)
        session = self._resolve_session(key, incoming)
        # MQTT 3.1.1: the server disconnects a client silent for 1.5 x keep-alive.
        session.keep_alive = math.ceil(incoming.keep_alive * 1.5) if incoming.keep_alive > 0 else 0
        session.transitions.connect()
        handler.attach(session, reader, writer)
        handler.certificate = result.certificate
        handler.identity = (pk, dk)
        handler.listener = server
        self._sessions[key] = (session, handler)
        self._identity[key] = (pk, dk)
        self._served[key] = handler
        try:
            await handler.mqtt_connack_authorize(True)
            await handler.start()
            self.outbox.attach(key, handler)
            await self._call_hook(self.hooks.device_connected(pk, dk))
            await self._publish_session_retained_messages(session)
            for topic_filter, qos in list(self._session_filters.get(key, {}).items()):
                await self._publish_retained_messages_for_subscription((topic_filter, qos), session)
        except BaseException:
            await self._finish(session, handler, pk, dk, None)  # _client_connected releases
            raise
        # What the reader put in the inbox meanwhile (a SUBSCRIBE, the disconnect) is handled now.
        handler.inbox.serve(self._spawn_drain, handler)
        return True

    async def _finish(self, session: Session, handler: Handler, pk: str, dk: str, server: Server | None) -> None:
        """The end of a connection, however it ended; with `server`, the socket and the
        listener's count are released too."""
        key = session.client_id or ""
        handler.inbox.close()
        self.outbox.detach(key, handler)
        try:
            if session.transitions.is_connected():
                await self._stop_handler(handler)
                session.transitions.disconnect()
                # Let go before the hook, not after its commit: the hook queues its offline
                # write in this same step, so a take-over woken by `ended` queues the device's
                # online write after it, without waiting seconds for a group commit behind a
                # rollout's progress reports (meanwhile the device held two sockets, and the
                # take-over gave up after 5 s with the writes in either order).
                self._let_go(key, handler, server)
                await self._call_hook(self.hooks.device_disconnected(pk, dk))
        finally:
            self._let_go(key, handler, server)

    def _let_go(self, key: str, handler: Handler, server: Server | None) -> None:
        """The connection is gone for the broker (once): its socket, count and session slot."""
        if handler.has_ended:
            return
        if self._served.get(key) is handler:
            del self._served[key]
        if server is not None and handler.writer is not None:
            release_socket(handler.writer)  # however the connection ended
            server.release_connection()
        handler.set_ended()

    async def _take_over(self, key: str) -> None:
        """Close the device's live connection (MQTT-3.1.4-2) and wait until it is fully gone."""
        entry = self._sessions.get(key)
        if entry is None or not entry[0].transitions.is_connected():
            return
        log.info("%s connected again; closing its previous connection", key)
        served = self._served.get(key)
        await entry[1].handle_connection_closed()
        if served is not None:
            # Its socket goes now, not when its last message has been handled: that message may
            # wait seconds for its commit, and a reboot wave held two descriptors per device
            # meanwhile (the leader of a 50,000-device rollout ran out). Nothing more is written
            # to it: the connection is closed for the handler already.
            if served.writer is not None:
                release_socket(served.writer)
            try:
                async with asyncio.timeout(5):  # not wait_for: see JobEngine._run
                    await asyncio.shield(served.ended())
            except TimeoutError:
                log.warning("previous connection of %s did not close in time", key)

    def _resolve_session(self, key: str, incoming: Session) -> Session:
        existing = self._sessions.get(key)
        incoming.client_id = key
        if existing is not None:
            old = existing[0]
            if not incoming.clean_session and old.clean_session is False:
                # Resume the persistent session with the new connection's parameters.
                old.will_flag, old.will_message = incoming.will_flag, incoming.will_message
                old.will_topic, old.will_qos = incoming.will_topic, incoming.will_qos
                old.will_retain = incoming.will_retain
                old.username, old.password = incoming.username, incoming.password
                old.remote_address, old.remote_port = incoming.remote_address, incoming.remote_port
                old.parent = 1
                return old
            # A clean session (old or new) is never resumed: drop the old one entirely.
            self._forget_session(key, old)
        incoming.parent = 0
        return incoming

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Stock reads session.retained_messages on every CONNECT (a debug line sizes it), which
        # would make the queue LightSession only makes when something is put in it.
        if isinstance(session, LightSession) and not session.has_retained():
            return
        await super()._publish_session_retained_messages(session)

    def _forget_session(self, key: str, session: Session) -> None:
        self._sessions.pop(key, None)
        self._drop_filters(key)
        session.clear_queues()

    def _spawn_drain(self, handler: Handler) -> None:
        assert handler.session is not None
        pk, dk = handler.identity
        _keep(asyncio.create_task(self._drain(handler.session, handler, pk, dk, handler.listener)))

    async def _drain(self, session: Session, handler: Handler, pk: str, dk: str, server: Server) -> None:
        # Replaces amqtt's _client_message_loop and its four waiter tasks per client (which
        # also logged repr() of the whole subscription table on every SUBSCRIBE and stopped
        # serving on a bad topic): a task that works through the connection's inbox in order,
        # started when an item arrives and ended when none is left (the inbox starts the next
        # one), so an idle connection has no task waiting on its inbox.
        inbox = handler.inbox
        try:
            while (item := inbox.next_item()) is not None:
                if isinstance(item, Closed):
                    inbox.close()
                    self.outbox.detach(session.client_id or "", handler)
                    await self._stop_handler(handler)
                    session.transitions.disconnect()
                    if item.packet is None and session.will_flag:
                        log.info("%s/%s dropped; its will message is not published (devices only)", pk, dk)
                    self._let_go(session.client_id or "", handler, server)  # before the hook: see _finish
                    await self._call_hook(self.hooks.device_disconnected(pk, dk))
                    await self._finish(session, handler, pk, dk, server)
                    return
                await self._handle_item(session, handler, pk, dk, item)
        except BaseException as exc:
            # As when the connection's task ended with an exception: logged, then the end of it.
            if isinstance(exc, AMQTTError | MQTTError | NoDataError | ConnectionError):
                log.info("connection ended: %r", exc)
            elif isinstance(exc, Exception):
                log.exception("unexpected error serving an MQTT connection")
            await self._finish(session, handler, pk, dk, server)
            if not isinstance(exc, Exception):
                raise  # cancelled: still cancelled once the end is done

    async def _handle_item(self, session: Session, handler: Handler, pk: str, dk: str, item: Any) -> None:
        """One SUBSCRIBE, UNSUBSCRIBE or device message, in the order they arrived."""
        if isinstance(item, Subscription):
            codes = [await self.add_subscription(topic, session) for topic in item.topics]
            await handler.mqtt_acknowledge_subscription(item.packet_id, codes)
            for (topic_filter, _), code in zip(item.topics, codes, strict=True):
                if code != SUBSCRIBE_REFUSED:
                    await self._publish_retained_messages_for_subscription((topic_filter, code), session)
        elif isinstance(item, UnSubscription):
            for topic_filter in item.topics:
                self._del_subscription(topic_filter, session)
            await handler.mqtt_acknowledge_unsubscription(item.packet_id)
        else:
            await self._device_publish(session, pk, dk, item)

    async def _device_publish(self, session: Session, pk: str, dk: str, message: Any) -> None:
        self.messages_in += 1
        topic: str = message.topic or ""
        if not protocol.topic_allowed(topic, pk, dk, is_filter=False):
            log.warning("dropped PUBLISH from %s/%s to forbidden topic %r", pk, dk, topic)
            return
        data = bytes(message.data or b"")
        # Retained messages are not kept: the device protocol has no use for them, and kept
        # they would be memory any device could fill without bound. The message itself is
        # handled as if the flag were not set.
        suffix = protocol.handled_suffix(topic, pk, dk)
        if suffix is not None:
            await self._call_hook(self.hooks.device_message(pk, dk, suffix, data))
        # A device may subscribe to its own concrete topics: serve those from the exact index.
        for target, qos in self._subscriptions.get(topic, ()):
            if target.transitions.is_connected():
                handler = self._get_handler(target)
                if handler is not None:
                    _keep(asyncio.create_task(publish(handler, topic, data, min(qos, message.qos or 0))))

    @staticmethod
    async def _call_hook(awaitable: Awaitable[None]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("device hook failed")

    # ------------------------------------------------------------ subscriptions and ACL

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        key = session.client_id or ""
        ident = self._identity.get(key)
        if ident is None or not protocol.topic_allowed(topic_filter, ident[0], ident[1], is_filter=True):
            log.warning("refused SUBSCRIBE of %s to %r", key, topic_filter)
            return SUBSCRIBE_REFUSED
        qos = min(max(qos, 0), 2)
        subscribers = self._subscriptions.setdefault(topic_filter, [])
        filters = self._session_filters.setdefault(key, {})
        if topic_filter in filters:
            subscribers[:] = [(s, q) for s, q in subscribers if s.client_id != key]
        subscribers.append((session, qos))
        filters[topic_filter] = qos
        return qos

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        ident = self._identity.get(session.client_id or "")
        if ident is None:
            return False
        return protocol.topic_allowed(topic, ident[0], ident[1], is_filter=action == Action.SUBSCRIBE)

    def _drop_filters(self, key: str) -> None:
        for topic_filter in self._session_filters.pop(key, {}):
            subscribers = self._subscriptions.get(topic_filter)
            if subscribers is None:
                continue
            subscribers[:] = [(s, q) for s, q in subscribers if s.client_id != key]
            if not subscribers:
                del self._subscriptions[topic_filter]

    async def _del_all_subscriptions(self, session: Session) -> None:
        # Stock scans every filter in the broker; the per-session index makes this O(own filters).
        self._drop_filters(session.client_id or "")

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        key = session.client_id or ""
        filters = self._session_filters.get(key, {})
        if filters.pop(a_filter, None) is None:
            return 0
        subscribers = self._subscriptions.get(a_filter, [])
        subscribers[:] = [(s, q) for s, q in subscribers if s.client_id != key]
        if not subscribers:
            self._subscriptions.pop(a_filter, None)
        return 1

    async def _cleanup_session(self, client_id: str) -> None:
        # The stock session monitor picks expired sessions, then awaits between them: by
        # then the device may have connected again, and its new session must survive.
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.is_connected() and not self._closing:
            return
        await super()._cleanup_session(client_id)
        self._identity.pop(client_id, None)

    async def shutdown(self) -> None:
        self._closing = True
        await super().shutdown()
        # Stock shutdown does not wait for connection handlers to finish; ours run hooks
        # that write to the store, which the app closes next.
        pending = [f for f in (h.ended() for h in self._served.values()) if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)

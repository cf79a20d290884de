"""Per-connection pieces of the broker: a light session and a protocol handler with one inbox.

Stock amqtt 0.12.1 spends most of a connection's cost here: every Session builds a
`transitions` state machine (~14 % of a connect storm's CPU and a large share of its
~54 KB per connection), the reader loop wraps each packet read in `asyncio.wait_for`
(a new task per packet on Python 3.11) and spawns another task per packet, and the
broker keeps four waiter tasks per client for disconnect / subscribe / unsubscribe /
deliver. Here one task per connection reads packets and handles them inline; everything
the broker must act on (messages, SUBSCRIBE, UNSUBSCRIBE, disconnect) goes into one queue
that the connection's own task consumes in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.adapters import BufferReader, ReaderAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session

log = logging.getLogger(__name__)

MQTT_3_1_1 = 4


def release_socket(writer: WriterAdapter) -> None:
    """Close a finished connection's socket if amqtt did not.

    amqtt's writer close drains before it closes; when the peer has already gone, the drain
    raises, amqtt logs it at debug level, and the transport is never closed: one leaked file
    descriptor per such connection (the 2,000-device soak kept over a thousand).
    """
    inner = getattr(writer, "_writer", None)
    transport = getattr(inner, "transport", None)
    if transport is not None and not transport.is_closing():
        transport.abort()


def _protocol_level(body: bytes) -> int | None:
    """The protocol level byte of a CONNECT's variable header (after the protocol name), or None."""
    if len(body) < 2:
        return None
    end = 2 + int.from_bytes(body[:2], "big")
    return body[end] if len(body) > end else None


class _States:
    """Replaces the per-session `transitions.Machine` with the three states amqtt uses."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def connect(self) -> None:
        if self.state == "connected":
            raise ValueError("session already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()


class LightSession(Session):
    """An amqtt Session without the state-machine library (same attributes and states)."""

    def _init_states(self) -> None:
        self.transitions = _States(self)


class Closed:
    """Inbox item: the connection ended (`packet` is the DISCONNECT, or None when it just dropped)."""

    __slots__ = ("packet",)

    def __init__(self, packet: DisconnectPacket | None) -> None:
        self.packet = packet


class Handler(BrokerProtocolHandler):
    """BrokerProtocolHandler with one reader task, inline dispatch and one inbox queue."""

    def __init__(self, plugins_manager: PluginManager[Any], max_packet: int, session: Session | None = None) -> None:
        super().__init__(plugins_manager, session)
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.max_packet = max_packet
        self._closed = False
        self.certificate = ""  # serial of the device certificate the connection logged in with

    @classmethod
    async def read_connect(
        cls, reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: PluginManager[Any], max_packet: int
    ) -> tuple[Handler, LightSession] | None:
        """Read and check the CONNECT packet (replaces init_from_connect). None = refused and closed.

        Raises MQTTError for a first packet that is not a usable CONNECT.
        """
        header = await MQTTFixedHeader.from_stream(reader)
        if header is None:
            raise NoDataError("closed before CONNECT")
        if header.packet_type != CONNECT:
            raise MQTTError(f"first packet is of type {header.packet_type}, not CONNECT")
        if header.remaining_length > max_packet:
            raise MQTTError(f"{header.remaining_length}-byte CONNECT is over the limit of {max_packet}")
        body = await reader.read(header.remaining_length)
        if _protocol_level(body) not in (None, MQTT_3_1_1):
            # MQTT 5 (or 3.1) lays the packet out differently: say so before parsing it as 3.1.1.
            await ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION).to_stream(writer)
            await writer.close()
            return None
        try:
            connect = await ConnectPacket.from_stream(BufferReader(body), fixed_header=header)
        except (NoDataError, ValueError, UnicodeDecodeError, IndexError) as exc:
            raise MQTTError(f"malformed CONNECT: {exc!r}") from exc
        if connect.variable_header is None or connect.payload is None:
            raise MQTTError("CONNECT packet incomplete")
        if connect.proto_name != "MQTT" or connect.variable_header.reserved_flag:
            raise MQTTError(f"bad CONNECT (protocol {connect.proto_name!r})")
        if connect.variable_header.will_flag and (connect.payload.will_topic is None or connect.will_message is None):
            raise MQTTError("will flag set without will topic/message")
        code = 0
        if (connect.password_flag and not connect.username_flag) or (
            connect.username_flag and connect.username is None
        ):
            code = BAD_USERNAME_PASSWORD
        elif not connect.clean_session_flag and connect.payload.client_id_is_random:
            code = IDENTIFIER_REJECTED
        if code:
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            return None
        session = LightSession()
        session.client_id = connect.client_id
        session.clean_session = connect.clean_session_flag
        session.will_flag = connect.will_flag
        session.will_retain = connect.will_retain_flag
        session.will_qos = connect.will_qos
        session.will_topic = connect.will_topic
        session.will_message = connect.will_message
        session.username = connect.username
        session.password = connect.password
        session.keep_alive = max(connect.keep_alive, 0)
        peer = writer.get_peer_info()
        if peer is not None:
            session.remote_address, session.remote_port = peer
        return cls(plugins_manager, max_packet), session

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        super().attach(session, reader, writer)
        # The broker side needs no write-side keep-alive timer (stock re-arms one per packet).
        self.keepalive_timeout = None
        # Incoming application messages land in the same queue as everything else, so the
        # connection's task sees them in the order the packets arrived.
        session.delivered_message_queue = self.inbox

    async def _reader_loop(self) -> None:
        # Replaces ProtocolHandler._reader_loop: no task per packet, no wait_for per read;
        # a client silent for the session's keep-alive (already 1.5 x) is disconnected.
        # Each packet is read whole (its announced length, within max_packet) before it is
        # decoded, so a packet that lies about its contents can never make the decoder read
        # into the next one or wait for bytes that will not come.
        assert self._reader_ready is not None and self.reader is not None and self.session is not None
        self._reader_ready.set()
        timeout = self.session.keep_alive or None
        who = self.session.client_id
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        header = await MQTTFixedHeader.from_stream(self.reader)
                        if header is None:
                            break  # EOF
                        problem = self.refusal(header)
                        if problem:
                            log.info("%s: %s; closing", who, problem)
                            break
                        body = await self.reader.read(header.remaining_length)
                except TimeoutError:
                    log.info("keep-alive expired for %s; closing", who)
                    break
                except MQTTError as exc:  # a bad fixed header: the stream cannot be followed any more
                    log.info("%s sent a malformed packet header (%s); closing", who, exc)
                    break
                try:
                    packet = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
                except MQTTError as exc:
                    # A well-framed packet we refuse (see broker._read_publish_header): go on.
                    log.info("%s: packet discarded: %s", who, exc)
                    continue
                except Exception as exc:  # attacker bytes: any decoding failure is a malformed packet
                    log.info("%s sent a malformed packet (type %d: %r); closing", who, header.packet_type, exc)
                    break
                if header.packet_type in (SUBSCRIBE, UNSUBSCRIBE) and not (packet.payload and packet.payload.topics):
                    log.info("%s sent a SUBSCRIBE or UNSUBSCRIBE without a topic filter; closing", who)
                    break  # [MQTT-3.8.3-3], [MQTT-3.10.3-2]
                try:
                    if await self._dispatch(header.packet_type, packet):
                        break
                except AMQTTError as exc:  # amqtt's protocol flow refused the packet
                    log.info("%s: %s; closing", who, exc)
                    break
        except (NoDataError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("reader of %s failed", who)
        finally:
            await self.handle_connection_closed()
            self._reader_stopped.set()

    def refusal(self, header: MQTTFixedHeader) -> str:
        """Why a packet must not even be read (its fixed header says enough), or ""."""
        if header.packet_type in (RESERVED_0, RESERVED_15, CONNECT):
            return f"sent packet type {header.packet_type}"
        if header.remaining_length > self.max_packet:
            return f"announced a {header.remaining_length}-byte packet, over the limit of {self.max_packet}"
        if header.packet_type == PUBLISH and (header.flags >> 1) & 0x03 == 0x03:
            return "sent a PUBLISH with QoS 3 [MQTT-3.3.1-4]"
        return ""

    async def _dispatch(self, kind: int, packet: Any) -> bool:
        """Handle one packet inline; True when the connection is over."""
        if kind == PUBLISH and isinstance(packet, PublishPacket):
            await self.handle_publish(packet)
        elif kind == PUBACK:
            await self.handle_puback(packet)
        elif kind == PINGREQ:
            await self.handle_pingreq(packet)
        elif kind == SUBSCRIBE:
            await self.handle_subscribe(packet)
        elif kind == UNSUBSCRIBE:
            await self.handle_unsubscribe(packet)
        elif kind == PUBREC:
            await self.handle_pubrec(packet)
        elif kind == PUBREL:
            await self.handle_pubrel(packet)
        elif kind == PUBCOMP:
            await self.handle_pubcomp(packet)
        elif kind == DISCONNECT:
            await self.handle_disconnect(packet)
            return True
        return False

    async def handle_subscribe(self, subscribe: Any) -> None:
        self.inbox.put_nowait(Subscription(subscribe.variable_header.packet_id, subscribe.payload.topics))

    async def handle_unsubscribe(self, unsubscribe: Any) -> None:
        self.inbox.put_nowait(UnSubscription(unsubscribe.variable_header.packet_id, unsubscribe.payload.topics))

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        if not self._closed:
            self._closed = True
            self.inbox.put_nowait(Closed(disconnect))

    async def handle_connection_closed(self) -> None:
        await self.handle_disconnect(None)

    def send_qos0(self, topic: str, payload: bytes) -> bool:
        """Write a QoS 0 PUBLISH without a task or a drain (the transport buffers it)."""
        if self.writer is None or self._closed:
            return False
        self.writer.write(PublishPacket.build(topic, payload, None, False, 0, False).to_bytes())
        return True

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

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.errors import MQTTError, NoDataError
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

    def __init__(self, plugins_manager: PluginManager[Any], session: Session | None = None) -> None:
        super().__init__(plugins_manager, session)
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False

    @classmethod
    async def read_connect(
        cls, reader: ReaderAdapter, writer: WriterAdapter, plugins_manager: PluginManager[Any]
    ) -> tuple[Handler, LightSession] | None:
        """Read and check the CONNECT packet (replaces init_from_connect). None = refused and closed."""
        connect = await ConnectPacket.from_stream(reader)
        if connect.variable_header is None or connect.payload is None:
            raise MQTTError("CONNECT packet incomplete")
        if connect.proto_name != "MQTT" or connect.variable_header.reserved_flag:
            raise MQTTError(f"bad CONNECT (protocol {connect.proto_name!r})")
        if connect.variable_header.will_flag and (connect.payload.will_topic is None or connect.will_message is None):
            raise MQTTError("will flag set without will topic/message")
        code = 0
        if connect.proto_level != MQTT_3_1_1:
            code = UNACCEPTABLE_PROTOCOL_VERSION
        elif (connect.password_flag and not connect.username_flag) or (
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
        return cls(plugins_manager), session

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
        assert self._reader_ready is not None and self.reader is not None and self.session is not None
        self._reader_ready.set()
        timeout = self.session.keep_alive or None
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        header = await MQTTFixedHeader.from_stream(self.reader)
                        if header is None:
                            break  # EOF
                        if header.packet_type in (RESERVED_0, RESERVED_15, CONNECT):
                            log.warning("%s sent packet type %d; closing", self.session.client_id, header.packet_type)
                            break
                        packet = await packet_class(header).from_stream(self.reader, fixed_header=header)
                except MQTTError as exc:
                    # The bad packet was read whole (see broker._read_publish_header): go on.
                    log.info("%s: packet discarded: %s", self.session.client_id, exc)
                    continue
                except TimeoutError:
                    log.info("keep-alive expired for %s; closing", self.session.client_id)
                    break
                if await self._dispatch(header.packet_type, packet):
                    break
        except (NoDataError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("reader of %s failed", self.session.client_id)
        finally:
            await self.handle_connection_closed()
            self._reader_stopped.set()

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

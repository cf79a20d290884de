"""Per-connection pieces of the broker: a light session and a protocol handler with one inbox.

Stock amqtt 0.12.1 spends most of a connection's cost here: every Session builds a
`transitions` state machine (~14 % of a connect storm's CPU and a large share of its
~54 KB per connection), the reader loop wraps each packet read in `asyncio.wait_for`
(a new task per packet on Python 3.11) and spawns another task per packet, and the
broker keeps four waiter tasks per client for disconnect / subscribe / unsubscribe /
deliver. Here one task per connection reads packets and handles them inline; everything
the broker must act on (messages, SUBSCRIBE, UNSUBSCRIBE, disconnect) goes into one inbox,
which a short-lived task of the broker's works through in order while it has items.

Memory (bench/connection_memory.py, bench/RESULTS.md "Per-connection memory"): an idle device
held five asyncio Queues (two in its Session, two in BrokerProtocolHandler, our inbox) and two
more Events, each Queue three deques and an Event, each Event a deque: 19 deques of ~380 bytes,
half of a connection's ~30 KB of Python heap, for queues that otabox never fills. The session
and handler below create none of them; the inbox is a deque made only while items wait. An
idle connection is now ~9 KB of RSS, of which ~5.4 KB is asyncio streams' own floor.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Callable
from typing import Any

from amqtt.adapters import BufferReader, ReaderAdapter, StreamReaderAdapter, WriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError, ProtocolHandlerError
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
# The logger amqtt's handler code writes to (its debug lines), shared by every connection.
_AMQTT_HANDLER_LOG = logging.getLogger("amqtt.mqtt.protocol.handler")

MQTT_3_1_1 = 4


def release_socket(writer: WriterAdapter) -> None:
    """Close a finished connection's socket if amqtt did not.

    amqtt's writer close drains before it closes; when the peer has already gone, the drain
    raises, amqtt logs it at debug level, and the transport is never closed: one leaked file
    descriptor per such connection (the 2,000-device soak kept over a thousand).
    """
    inner = getattr(writer, "_writer", None)
    transport = getattr(inner, "transport", None)
    if transport is None:
        return
    if not transport.is_closing():
        transport.abort()
    # After the transport's connection_lost, which abort() and close() schedule just before.
    asyncio.get_running_loop().call_soon(_uncycle, transport)


def _uncycle(transport: asyncio.BaseTransport) -> None:
    """Break the reference cycle CPython 3.11's selector transport makes with itself.

    It keeps a bound method of its own (`_read_ready_cb`) after the connection is lost, so every
    closed connection's transport, socket and extras waited for a full garbage collection, which
    the server's thresholds (`app.tune_gc`) make rare: under churn (the soak: 440,000 connections
    in 30 minutes) that was most of the RSS growth. Without the cycle they go at once.
    """
    if transport.is_closing() and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


def _protocol_level(body: bytes) -> int | None:
    """The protocol level byte of a CONNECT's variable header (after the protocol name), or None."""
    if len(body) < 2:
        return None
    end = 2 + int.from_bytes(body[:2], "big")
    return body[end] if len(body) > end else None


class _States:
    """Replaces the per-session `transitions.Machine` with the three states amqtt uses.

    It knows its session by a weak reference: a strong one made each session and its states a
    cycle, so every closed connection's session waited for a full garbage collection (rare with
    the server's thresholds, `app.tune_gc`) instead of going when its last reference did; under
    churn that was most of the soak's RSS growth.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session: Callable[[], Session | None] = weakref.ref(session)
        self.state = "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def connect(self) -> None:
        if self.state == "connected":
            raise ValueError("session already connected")
        self.state = "connected"
        session = self._session()
        if session is not None:
            session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        session = self._session()
        if session is not None:
            session._on_enter_disconnected()


class LightSession(Session):
    """An amqtt Session without the state-machine library or its two queues (same attributes and states)."""

    # Slots, not an instance dict: amqtt's 30 attributes plus `transitions` are one more than
    # CPython 3.11 shares between instances' dicts, so each session had a dict of its own.
    __slots__ = (
        "_delivered",
        "_packet_id",
        "_retained",
        "attributes",
        "broker_uri",
        "cadata",
        "cafile",
        "capath",
        "clean_session",
        "client_id",
        "inflight_in",
        "inflight_out",
        "is_anonymous",
        "keep_alive",
        "last_connect_time",
        "last_disconnect_time",
        "parent",
        "password",
        "publish_retry_delay",
        "remote_address",
        "remote_port",
        "ssl_object",
        "transitions",
        "username",
        "will_flag",
        "will_message",
        "will_qos",
        "will_retain",
        "will_topic",
    )

    def __init__(self) -> None:
        # Replaces Session.__init__, which also built two asyncio Queues per session (~6.5 KB):
        # `retained_messages` (filled only by stock broadcasts to offline sessions, which otabox
        # never makes) and `delivered_message_queue` (replaced by the handler's inbox on attach).
        # Both are made on first use instead (the properties below). Same attributes, same values.
        self._init_states()
        self.remote_address: str | None = None
        self.remote_port: int | None = None
        self.client_id: str | None = None
        self.clean_session: bool | None = None
        self.will_flag: bool = False
        self.will_message: bytes | bytearray | None = None
        self.will_qos: int | None = None
        self.will_retain: bool | None = None
        self.will_topic: str | None = None
        self.keep_alive: int = 0
        self.publish_retry_delay: int = 0
        self.broker_uri: str | None = None
        self.username: str | None = None
        self.password: str | None = None
        self.cafile: str | None = None
        self.capath: str | None = None
        self.cadata: bytes | None = None
        self._packet_id: int = 0
        self.parent: int = 0
        self.last_connect_time: int | None = None
        self.ssl_object: Any = None
        self.last_disconnect_time: int | None = None
        self.attributes: dict[str, Any] = {}
        self.inflight_out: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.inflight_in: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._retained: asyncio.Queue[Any] | None = None
        self._delivered: Any = None
        self.is_anonymous: bool = False

    def _init_states(self) -> None:
        self.transitions = _States(self)

    @property
    def retained_messages(self) -> asyncio.Queue[Any]:
        if self._retained is None:
            self._retained = asyncio.Queue()
        return self._retained

    @retained_messages.setter
    def retained_messages(self, queue: asyncio.Queue[Any]) -> None:
        self._retained = queue

    def has_retained(self) -> bool:
        """Whether anything waits in `retained_messages` (without making the queue)."""
        return self._retained is not None and not self._retained.empty()

    @property
    def delivered_message_queue(self) -> Any:
        if self._delivered is None:
            self._delivered = Inbox()
        return self._delivered

    @delivered_message_queue.setter
    def delivered_message_queue(self, queue: Any) -> None:
        self._delivered = queue

    def clear_queues(self) -> None:
        # Stock clear_queues, on the queues that exist (it would make both to empty them).
        for queue in (self._retained, self._delivered):
            while queue is not None and not queue.empty():
                queue.get_nowait()


class Inbox:
    """Replaces the handler's asyncio.Queue: unbounded, first in first out, one consumer.

    An asyncio.Queue is three deques and an Event (a fourth deque), ~3.3 KB, kept for the whole
    connection; this is a few slots and a deque only while items wait. Its consumer is either a
    task in `get()` (a future only while it waits) or, once `serve(spawn)` is called, a task
    that `spawn(owner)` starts when an item arrives and nobody is working through the inbox: it
    takes items with `next_item()` until None, which also marks the inbox as unattended again.
    Also the calls amqtt makes on the session's `delivered_message_queue` (`put`, `put_nowait`,
    `get`, `empty`, `get_nowait`, `qsize`).
    """

    __slots__ = ("_busy", "_items", "_owner", "_spawn", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._spawn: Callable[[Any], None] | None = None
        self._owner: Any = None
        self._busy = False  # a task started by `_spawn` is working through the items

    def put_nowait(self, item: Any) -> None:
        if self._spawn is None and self._busy:
            return  # closed
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._wake()

    def serve(self, spawn: Callable[[Any], None], owner: Any) -> None:
        """From now on, `spawn(owner)` starts a task for what arrives (at once if items wait)."""
        self._spawn, self._owner = spawn, owner
        self._wake()

    def _wake(self) -> None:
        if self._spawn is not None and not self._busy and self._items:
            self._busy = True
            self._spawn(self._owner)

    def next_item(self) -> Any:
        """The next item, or None when there is none (the inbox then starts a task for the next)."""
        if not self._items:
            if self._spawn is not None:  # not closed
                self._busy = False
            return None
        return self.get_nowait()

    def close(self) -> None:
        """The connection is over: nothing more is started, and what still arrives is dropped."""
        self._spawn = self._owner = None
        self._busy = True
        self._items = None

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle connection holds no deque
        return item

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0


_DISCARDED = object()  # Handler._decode: a packet refused, the connection goes on


class Closed:
    """Inbox item: the connection ended (`packet` is the DISCONNECT, or None when it just dropped)."""

    __slots__ = ("packet",)

    def __init__(self, packet: DisconnectPacket | None) -> None:
        self.packet = packet


class Handler(BrokerProtocolHandler):
    """BrokerProtocolHandler with one reader task, inline dispatch and one inbox."""

    # Slots, ours and amqtt's: no instance dict (amqtt's own code assigns these same names).
    __slots__ = (
        "_closed",
        "_disconnect_waiter",
        "_ended",
        "_expired",
        "_has_ended",
        "_keepalive_task",
        "_loop",
        "_puback_waiters",
        "_pubcomp_waiters",
        "_pubrec_waiters",
        "_pubrel_waiters",
        "_reader_ready",
        "_reader_task",
        "_reading_since",
        "_silence",
        "_stream",
        "_write_lock",
        "certificate",
        "identity",
        "inbox",
        "keepalive_timeout",
        "listener",
        "logger",
        "max_packet",
        "plugins_manager",
        "reader",
        "session",
        "writer",
    )

    def __init__(self, plugins_manager: PluginManager[Any], max_packet: int) -> None:
        # Replaces ProtocolHandler.__init__ and BrokerProtocolHandler.__init__ (not called): the
        # same attributes without what otabox never uses: a LoggerAdapter per connection (one
        # shared logger instead), the `_reader_stopped` Event (stop() waits for the reader task
        # itself), and BrokerProtocolHandler's pending (un)subscription Queues (SUBSCRIBE and
        # UNSUBSCRIBE go into the inbox), ~8 KB per connection together.
        self.logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = _AMQTT_HANDLER_LOG
        self.session: Session | None = None
        self.reader: ReaderAdapter | None = None
        self.writer: WriterAdapter | None = None
        self.plugins_manager: PluginManager[Any] = plugins_manager
        self._loop = asyncio.get_running_loop()
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.TimerHandle | None = None
        self._reader_ready: asyncio.Event | None = None  # never made: see start()
        self._puback_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrec_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubrel_waiters: dict[int, asyncio.Future[Any]] = {}
        self._pubcomp_waiters: dict[int, asyncio.Future[Any]] = {}
        self._write_lock = asyncio.Lock()
        self._disconnect_waiter: asyncio.Future[DisconnectPacket | None] | None = None  # never made: see start()
        self.keepalive_timeout: int | None = None
        self.inbox = Inbox()
        self.max_packet = max_packet
        self._closed = False
        self._stream: asyncio.StreamReader | None = None  # the socket's StreamReader, when we have it
        self._ended: asyncio.Future[None] | None = None  # made only for who waits for the end
        self._has_ended = False
        self._silence: asyncio.TimerHandle | None = None  # the keep-alive timer (see _silent)
        self._reading_since: float | None = None  # loop time the current packet read began
        self._expired = False  # the keep-alive timer cancelled the reader
        self.certificate = ""  # serial of the device certificate the connection logged in with
        self.identity: tuple[str, str] = ("", "")  # (product key, device key), set by the broker
        self.listener: Any = None  # the broker's listener (amqtt Server) it came in on

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

    def _init_session(self, session: Session) -> None:
        # Replaces ProtocolHandler._init_session: no LoggerAdapter per connection (its "client_id"
        # extra is in no format otabox logs with), and no write-side keep-alive timer, which the
        # broker side does not need (stock re-arms one per packet sent).
        if not session:
            raise ProtocolHandlerError("Session cannot be None")
        self.session = session
        self.keepalive_timeout = None

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        super().attach(session, reader, writer)
        if isinstance(reader, StreamReaderAdapter):
            # The reader loop waits on the StreamReader itself: an idle connection's task then
            # sits two coroutine frames deep instead of six (adapter, codec, fixed-header parser).
            self._stream = reader._reader
        # Incoming application messages land in the same inbox as everything else, so the
        # connection's task sees them in the order the packets arrived.
        session.delivered_message_queue = self.inbox  # type: ignore[assignment]

    async def start(self) -> None:
        # Replaces ProtocolHandler.start and BrokerProtocolHandler.start: no `_reader_ready` and
        # `_reader_stopped` Events and no `_disconnect_waiter` future (nothing awaits it: the
        # disconnect goes into the inbox). One yield lets the new reader task run up to its first
        # read, which is all stock's ready-event waited for; then in-flight messages of a resumed
        # session are sent again ([MQTT-4.4.0-1]) as stock does.
        if not self._is_attached():
            raise ProtocolHandlerError("Handler is not attached to a stream")
        self._reader_task = asyncio.create_task(self._reader_loop())
        await asyncio.sleep(0)
        await self._retry_deliveries()

    async def stop(self) -> None:
        # Replaces ProtocolHandler.stop and BrokerProtocolHandler.stop: the same steps, waiting
        # for the reader task itself instead of its `_reader_stopped` Event; there are no pending
        # (un)subscription queues to empty and no disconnect waiter to resolve.
        self._stop_waiters()
        if self._keepalive_task:
            self._keepalive_task.cancel()
        self._stop_silence()
        task = self._reader_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])
        try:
            if self.writer is not None:
                await self.writer.close()
        except (asyncio.CancelledError, TimeoutError, OSError):
            log.debug("closing the writer of %s failed", self.session and self.session.client_id, exc_info=True)

    async def _read_header(self) -> MQTTFixedHeader | None:
        """Replaces MQTTFixedHeader.from_stream (same result, same errors) when the socket's
        StreamReader is at hand: None at the end of the stream, MQTTError for a remaining length
        of more than four bytes."""
        stream = self._stream
        if stream is None:
            assert self.reader is not None
            return await MQTTFixedHeader.from_stream(self.reader)
        try:
            first = (await stream.readexactly(1))[0]
            length, multiplier = 0, 1
            while True:
                byte = (await stream.readexactly(1))[0]
                length += (byte & 0x7F) * multiplier
                if not byte & 0x80:
                    break
                multiplier *= 128
                if multiplier > 128**3:
                    raise MQTTError(f"Invalid remaining length bytes, packet_type={first >> 4}")
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            return None
        return MQTTFixedHeader(first >> 4, first & 0x0F, length)

    async def _reader_loop(self) -> None:
        # Replaces ProtocolHandler._reader_loop: no task per packet, no wait_for per read;
        # a client silent for the session's keep-alive (already 1.5 x) is disconnected: one
        # whose next packet has not arrived whole that long after its read began (one timer
        # per connection, see _silent).
        # Each packet is read whole (its announced length, within max_packet) before it is
        # decoded, so a packet that lies about its contents can never make the decoder read
        # into the next one or wait for bytes that will not come.
        assert self.reader is not None and self.session is not None
        timeout = self.session.keep_alive or None
        who = self.session.client_id
        loop = self._loop
        if timeout is not None:
            self._silence = loop.call_at(loop.time() + timeout, self._silent, timeout)
        try:
            while True:
                self._reading_since = loop.time()
                try:
                    header = await self._read_header()
                    if header is None:
                        break  # EOF
                    problem = self.refusal(header)
                    if problem:
                        log.info("%s: %s; closing", who, problem)
                        break
                    body = await self._read_body(header.remaining_length)
                except asyncio.CancelledError:
                    if not self._keepalive_expired():
                        raise  # stopped
                    break
                except MQTTError as exc:  # a bad fixed header: the stream cannot be followed any more
                    log.info("%s sent a malformed packet header (%s); closing", who, exc)
                    break
                self._reading_since = None  # handling it is not silence
                packet = await self._decode(header, body, who)
                if packet is _DISCARDED:
                    continue
                if packet is None:
                    break
                try:
                    if await self._dispatch(header.packet_type, packet):
                        break
                except AMQTTError as exc:  # amqtt's protocol flow refused the packet
                    log.info("%s: %s; closing", who, exc)
                    break
                # Not held while the connection idles until its next packet (~300 bytes each).
                del header, body, packet
        except (NoDataError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("reader of %s failed", who)
        finally:
            self._stop_silence()
            await self.handle_connection_closed()

    async def _read_body(self, n: int) -> bytes:
        if self._stream is not None:
            return await self._stream.readexactly(n)
        assert self.reader is not None
        return await self.reader.read(n)

    def _keepalive_expired(self) -> bool:
        """Whether the reader was cancelled by the keep-alive timer (logged) rather than stopped."""
        if not self._expired:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # our own timer's cancellation, handled here
        log.info("keep-alive expired for %s; closing", self.session and self.session.client_id)
        return True

    def _stop_silence(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None

    async def _decode(self, header: MQTTFixedHeader, body: bytes, who: str | None) -> Any:
        """The packet read whole, decoded; `_DISCARDED` for one refused but well framed (the
        connection goes on), None for one that ends the connection (logged either way)."""
        try:
            packet = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
        except MQTTError as exc:
            # A well-framed packet we refuse (see broker._read_publish_header): go on.
            log.info("%s: packet discarded: %s", who, exc)
            return _DISCARDED
        except Exception as exc:  # attacker bytes: any decoding failure is a malformed packet
            log.info("%s sent a malformed packet (type %d: %r); closing", who, header.packet_type, exc)
            return None
        if header.packet_type in (SUBSCRIBE, UNSUBSCRIBE) and not (packet.payload and packet.payload.topics):
            log.info("%s sent a SUBSCRIBE or UNSUBSCRIBE without a topic filter; closing", who)
            return None  # [MQTT-3.8.3-3], [MQTT-3.10.3-2]
        return packet

    def _silent(self, timeout: float) -> None:
        """The keep-alive timer. Replaces an `asyncio.timeout()` around each packet read (a
        Timeout object, a timer handle and a context made and dropped per packet, and held while
        the connection idles): one handle per connection, moved on to the current read's deadline
        when it fires early; when a read has lasted `timeout`, the reader is cancelled."""
        now = self._loop.time()
        since = self._reading_since
        if since is not None and now - since >= timeout:
            self._silence = None
            self._expired = True
            if self._reader_task is not None:
                self._reader_task.cancel()
            return
        self._silence = self._loop.call_at((now if since is None else since) + timeout, self._silent, timeout)

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

    def ended(self) -> asyncio.Future[None]:
        """A future done once the broker has finished with this connection (`set_ended`)."""
        if self._ended is None:
            self._ended = self._loop.create_future()
            if self._has_ended:
                self._ended.set_result(None)
        return self._ended

    @property
    def has_ended(self) -> bool:
        return self._has_ended

    def set_ended(self) -> None:
        self._has_ended = True
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def send_qos0(self, topic: str, payload: bytes) -> bool:
        """Write a QoS 0 PUBLISH without a task or a drain (the transport buffers it)."""
        if self.writer is None or self._closed:
            return False
        self.writer.write(PublishPacket.build(topic, payload, None, False, 0, False).to_bytes())
        return True

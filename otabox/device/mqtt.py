"""Minimal pure-asyncio MQTT 3.1.1 client (plain TCP or TLS), sized for 10k simulated devices on one event loop."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = [
    "ConnectRefused",
    "ConnectionLost",
    "MQTTLiteClient",
    "MQTTLiteError",
    "ProtocolError",
    "encode_remaining_length",
    "small_tls_buffers",
]

# Fixed-header first bytes (type nibble << 4 | flags); only what a device-side client needs.
CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
PUBREC = 0x50
PUBREL = 0x62  # PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry flags 0b0010 [MQTT-3.6.1-1]
PUBCOMP = 0x70
SUBSCRIBE = 0x82
SUBACK = 0x90
UNSUBSCRIBE = 0xA2
UNSUBACK = 0xB0
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

MAX_REMAINING_LENGTH = 268_435_455  # four 7-bit groups, the protocol maximum
_PINGREQ_PKT = b"\xc0\x00"
_DISCONNECT_PKT = b"\xe0\x00"
_NO_PING = -1.0  # sentinel for "no PINGREQ awaiting its PINGRESP"
_REFUSE_REASONS = (
    "accepted",
    "unacceptable protocol version",
    "identifier rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)

# A TLS record carries at most 16 KiB of data: a read buffer of that size loses nothing.
TLS_READ_BUFFER = 16 * 1024


def small_tls_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Give this process's asyncio TLS connections a `size` read buffer instead of 256 KiB.

    asyncio's SSLProtocol allocates (and zeroes) a 256 KiB buffer per connection: for 10,000
    simulated devices 2.5 GiB of RSS, and ~1 ms of page faults per connect, more than the
    handshake itself (measured: 9,000 TLS connects took 20.4 s of client CPU and 2.7 GB, with
    16 KiB 11.5 s and 0.6 GB). It is a class attribute, so this affects every asyncio TLS
    connection of the process made afterwards (aiohttp's too); the simulator and the benchmark
    call it, a device SDK user need not.
    """
    asyncio.sslproto.SSLProtocol.max_size = size


MessageCallback = Callable[[str, bytes], Awaitable[None] | None]
DisconnectCallback = Callable[[BaseException | None], Awaitable[None] | None]


class MQTTLiteError(Exception):
    """Base class for mqttlite errors."""


class ConnectRefused(MQTTLiteError):
    """The broker answered CONNECT with a non-zero CONNACK return code."""

    def __init__(self, code: int) -> None:
        """Keep the raw return code so callers can branch on it."""
        reason = _REFUSE_REASONS[code] if code < len(_REFUSE_REASONS) else "unknown"
        super().__init__(f"connection refused: {code} ({reason})")
        self.code = code


class ConnectionLost(MQTTLiteError):
    """The connection is gone: peer closed, reset, or keepalive expired."""


class ProtocolError(MQTTLiteError):
    """The peer sent something that is not valid MQTT 3.1.1."""


def encode_remaining_length(n: int) -> bytes:
    """Encode the fixed-header remaining length as a 1-4 byte varint."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {n}")
    if n < 128:  # fast path: nearly every control packet
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _utf8(s: str) -> bytes:
    """Encode an MQTT UTF-8 string (2-byte big-endian length prefix)."""
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ValueError("MQTT string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    """Frame a packet body behind its fixed header."""
    return bytes((first,)) + encode_remaining_length(len(body)) + body


class MQTTLiteClient:
    """One MQTT 3.1.1 connection: a reader task plus a keepalive timer handle, nothing else."""

    __slots__ = (
        "_closed",
        "_done",
        "_interval",
        "_keepalive",
        "_last_tx",
        "_loop",
        "_pending",
        "_pid",
        "_ping_out",
        "_qos2_in",
        "_task",
        "_tasks",
        "_timer",
        "_writer",
        "client_id",
        "on_disconnect",
        "on_message",
        "raise_on_refuse",
    )

    def __init__(
        self,
        on_message: MessageCallback | None = None,
        on_disconnect: DisconnectCallback | None = None,
        *,
        raise_on_refuse: bool = True,
    ) -> None:
        """Create an unconnected client; callbacks may also be assigned later."""
        self.on_message = on_message
        self.on_disconnect = on_disconnect
        self.raise_on_refuse = raise_on_refuse
        self.client_id = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[None] | None = None
        # Packet id -> future for the matching PUBACK/SUBACK/UNSUBACK; ids are unique while in flight.
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._pid = 0
        self._keepalive = 0
        self._interval = 0.0
        self._last_tx = 0.0
        self._ping_out = _NO_PING
        self._closed = True
        # Created lazily: most simulated devices never see QoS 2 or async callbacks.
        self._qos2_in: set[int] | None = None
        self._tasks: set[asyncio.Future[None]] | None = None

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of the connection."""
        return not self._closed

    async def connect(
        self,
        host: str,
        port: int,
        client_id: str,
        username: str | None = None,
        password: str | bytes | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        timeout: float = 10,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> int:
        """Open TCP (with `tls`, TLS over it), send CONNECT, await CONNACK; return its code (or raise ConnectRefused).

        `server_hostname` is the name the server's certificate is checked against (default `host`).
        A failed handshake raises ssl.SSLError (an OSError), like any other connection failure.
        """
        if not self._closed:
            raise MQTTLiteError("already connected")
        if not 0 <= keepalive <= 0xFFFF:
            raise ValueError("keepalive must be 0..65535")
        if password is not None and username is None:
            raise ValueError("MQTT 3.1.1 forbids a password without a user name")
        flags = 0x02 if clean_session else 0
        payload = _utf8(client_id)
        if username is not None:
            flags |= 0x80
            payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            pw = password.encode() if isinstance(password, str) else password
            payload += struct.pack("!H", len(pw)) + pw
        body = b"\x00\x04MQTT\x04" + struct.pack("!BH", flags, keepalive) + payload

        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            # One deadline for TCP + TLS + CONNACK; asyncio.timeout() costs no extra task, unlike wait_for.
            async with asyncio.timeout(timeout):
                if tls is None:
                    reader, writer = await asyncio.open_connection(host, port)
                else:
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=tls, server_hostname=server_hostname or host, ssl_handshake_timeout=timeout
                    )
                writer.write(_packet(CONNECT, body))
                # CONNACK is read inline so a refused or timed-out connect never spawns a reader task.
                try:
                    ack = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    # Closed before CONNACK (a balancer whose server just died, a server
                    # shutting down): a connection failure like a refused connect, to retry.
                    raise ConnectionResetError("the server closed the connection before CONNACK") from None
            if ack[0] != CONNACK or ack[1] != 2:
                raise ProtocolError(f"expected CONNACK, got {ack!r}")
            code = ack[3]
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            raise
        if code:
            writer.transport.abort()
            if self.raise_on_refuse:
                raise ConnectRefused(code)
            return code

        self.client_id = client_id
        self._loop = loop
        self._writer = writer
        self._pending = {}
        self._qos2_in = None
        self._closed = False
        self._done = loop.create_future()
        self._keepalive = keepalive
        self._ping_out = _NO_PING
        self._last_tx = loop.time()
        if keepalive:
            self._interval = keepalive * 0.75
            # A timer handle, not read-with-timeout: asyncio.wait_for would wrap every read in a Task.
            self._timer = loop.call_at(self._last_tx + self._interval, self._on_timer)
        self._task = loop.create_task(self._read_loop(reader))
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The connection's transport information (asyncio's names: "peername", "ssl_object", "peercert", ...)."""
        writer = self._writer
        if self._closed or writer is None:
            return default
        return writer.get_extra_info(name, default)

    async def subscribe(self, topic: str, qos: int = 0) -> int:
        """Subscribe to one topic filter; return the granted QoS or 0x80 on failure."""
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        return await self._request(SUBSCRIBE, b"", _utf8(topic) + bytes((qos,)))

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe from one topic filter and wait for UNSUBACK."""
        await self._request(UNSUBSCRIBE, b"", _utf8(topic))

    async def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Publish; QoS 0 returns once written, QoS 1 waits for PUBACK."""
        if isinstance(payload, str):
            payload = payload.encode()
        if "+" in topic or "#" in topic or not topic:
            raise ValueError(f"invalid publish topic {topic!r}")
        first = PUBLISH | (0x01 if retain else 0)
        if qos == 0:
            await self._send(_packet(first, _utf8(topic) + payload))
            return
        if qos != 1:
            raise ValueError("publish supports qos 0 or 1")
        await self._request(first | 0x02, _utf8(topic), payload)

    async def disconnect(self) -> None:
        """Send DISCONNECT (so the broker drops any will) and close cleanly."""
        writer = self._writer
        if self._closed or writer is None:
            return
        writer.write(_DISCONNECT_PKT)
        self._shutdown(None, graceful=True)
        try:
            await writer.wait_closed()
        except OSError:
            pass  # the socket is gone either way; disconnect() must not fail on a racing reset

    def close(self) -> None:
        """Abort the TCP connection without DISCONNECT, like a device losing power."""
        self._shutdown(None, graceful=False)

    async def wait_closed(self) -> None:
        """Return once the current connection (if any) has been lost or closed."""
        if self._done is not None:
            await asyncio.shield(self._done)

    # ---- internals -------------------------------------------------------

    def _new_pending(self) -> tuple[int, asyncio.Future[int]]:
        """Allocate a free packet id (1..65535, wrapping) with an ack future."""
        if self._closed or self._loop is None:
            raise ConnectionLost("not connected")
        pending = self._pending
        pid = self._pid
        for _ in range(0xFFFF):
            pid = pid % 0xFFFF + 1
            if pid not in pending:
                self._pid = pid
                fut: asyncio.Future[int] = self._loop.create_future()
                pending[pid] = fut
                return pid, fut
        raise MQTTLiteError("all 65535 packet ids in flight")

    async def _request(self, first: int, head: bytes, tail: bytes) -> int:
        """Send head + packet id + tail and wait for the matching ack; return its result byte."""
        pid, fut = self._new_pending()
        try:
            await self._send(_packet(first, head + struct.pack("!H", pid) + tail))
            return await fut
        finally:
            self._pending.pop(pid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # mark retrieved when _send failed first, so asyncio doesn't warn at GC

    async def _send(self, data: bytes) -> None:
        """Write a packet and honour transport backpressure."""
        writer = self._writer
        if self._closed or writer is None:
            raise ConnectionLost("not connected")
        self._write(data)
        try:
            await writer.drain()
        except OSError as exc:
            raise ConnectionLost(str(exc)) from exc

    def _write(self, data: bytes) -> None:
        """Synchronous write that also records activity for the keepalive timer."""
        assert self._writer is not None and self._loop is not None
        self._writer.write(data)
        self._last_tx = self._loop.time()

    def _on_timer(self) -> None:
        """Keepalive tick: PINGREQ when idle, drop the link if a PINGRESP is overdue."""
        self._timer = None
        loop = self._loop
        if self._closed or loop is None:
            return
        now = loop.time()
        if self._ping_out != _NO_PING:
            if now - self._ping_out >= self._keepalive:
                self._shutdown(ConnectionLost("no PINGRESP within keepalive"), graceful=False)
                return
        elif now - self._last_tx >= self._interval:
            self._write(_PINGREQ_PKT)
            self._ping_out = now
        # Reschedule only when the timer fires, never per packet, to keep sends cheap. While a ping is
        # out, look again after one interval (next ping if answered) and finally at the keepalive deadline.
        ping = self._ping_out
        if ping == _NO_PING:
            due = self._last_tx + self._interval
        elif now < ping + self._interval:
            due = ping + self._interval
        else:
            due = ping + self._keepalive
        self._timer = loop.call_at(due, self._on_timer)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        """Read and dispatch packets until EOF or error; the only task per connection."""
        readexactly = reader.readexactly
        exc: BaseException
        try:
            while True:
                # Every packet is at least 2 bytes, so fetch header + first length byte in one call.
                head = await readexactly(2)
                b = head[1]
                length = b & 0x7F
                shift = 7
                while b & 0x80:
                    if shift > 21:
                        raise ProtocolError("remaining length longer than 4 bytes")
                    b = (await readexactly(1))[0]
                    length |= (b & 0x7F) << shift
                    shift += 7
                self._dispatch(head[0], await readexactly(length) if length else b"")
        except asyncio.CancelledError:
            return  # close()/disconnect() already did the bookkeeping
        except (asyncio.IncompleteReadError, OSError) as e:
            exc = ConnectionLost("connection closed by peer")
            exc.__cause__ = e
        except Exception as e:
            # Protocol errors and on_message failures end the connection and reach on_disconnect.
            exc = e
        self._shutdown(exc, graceful=False)

    def _dispatch(self, first: int, body: bytes) -> None:
        """Handle one complete packet."""
        kind = first & 0xF0
        if kind == PUBLISH:
            self._on_publish(first, body)
        elif kind in (PUBACK, SUBACK, UNSUBACK):
            fut = self._pending.get((body[0] << 8) | body[1])
            if fut is not None and not fut.done():
                fut.set_result(body[2] if kind == SUBACK else 0)
        elif kind == PINGRESP:
            self._ping_out = _NO_PING
        elif kind == PUBREL & 0xF0:
            # Second half of incoming QoS 2: forget the id, then PUBCOMP.
            if self._qos2_in is not None:
                self._qos2_in.discard((body[0] << 8) | body[1])
            self._write(bytes((PUBCOMP, 2)) + body[:2])
        else:
            raise ProtocolError(f"unexpected packet type 0x{first:02x}")

    def _on_publish(self, first: int, body: bytes) -> None:
        """Deliver an incoming PUBLISH and send the QoS acknowledgement."""
        tlen = (body[0] << 8) | body[1]
        topic = body[2 : 2 + tlen].decode()
        qos = (first >> 1) & 0x03
        if qos == 0:
            self._deliver(topic, body[2 + tlen :])
            return
        pid_bytes = body[2 + tlen : 4 + tlen]
        if qos == 1:
            # Ack after a sync callback returns, so a crashing handler leaves it unacked for redelivery.
            self._deliver(topic, body[4 + tlen :])
            self._write(bytes((PUBACK, 2)) + pid_bytes)
            return
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        pid = (pid_bytes[0] << 8) | pid_bytes[1]
        if self._qos2_in is None:
            self._qos2_in = set()
        # Deliver on first PUBLISH only; a DUP resend before PUBREL must not be delivered twice.
        if pid not in self._qos2_in:
            self._qos2_in.add(pid)
            self._deliver(topic, body[4 + tlen :])
        self._write(bytes((PUBREC, 2)) + pid_bytes)

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Invoke on_message; only an awaitable result costs a task."""
        cb = self.on_message
        if cb is not None:
            res = cb(topic, payload)
            if res is not None:
                self._spawn(res)

    def _spawn(self, aw: Awaitable[None]) -> None:
        """Run a callback's awaitable, holding a reference so it is not garbage-collected."""
        fut = asyncio.ensure_future(aw)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(fut)
        fut.add_done_callback(self._task_done)

    def _task_done(self, fut: asyncio.Future[Any]) -> None:
        """Drop the reference; an async callback failure ends the connection like a sync one."""
        if self._tasks is not None:
            self._tasks.discard(fut)
        if fut.cancelled() or (exc := fut.exception()) is None:
            return
        if self._closed:
            # Nothing left to tear down (e.g. on_disconnect itself failed): surface it, never swallow it.
            asyncio.get_running_loop().call_exception_handler(
                {"message": "mqttlite callback failed", "exception": exc, "future": fut}
            )
        else:
            self._shutdown(exc, graceful=False)

    def _shutdown(self, exc: BaseException | None, *, graceful: bool) -> None:
        """Tear down exactly once: stop timer and reader, fail waiters, fire on_disconnect."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        writer = self._writer
        if writer is not None:
            if graceful:
                writer.close()  # flushes the buffered DISCONNECT first
            else:
                writer.transport.abort()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        for fut in self._pending.values():
            if not fut.done():
                # A fresh exception per waiter: sharing one instance would chain unrelated tracebacks.
                lost = ConnectionLost("connection closed" if exc is None else f"connection lost: {exc}")
                lost.__cause__ = exc
                fut.set_exception(lost)
        self._pending.clear()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        cb = self.on_disconnect
        if cb is not None:
            res = cb(exc)
            if res is not None:
                self._spawn(res)

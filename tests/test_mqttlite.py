"""Tests for otabox.device.mqtt against a real in-process amqtt broker, plus a raw fake broker for edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from amqtt.broker import Broker

from otabox.device.mqtt import (
    PINGRESP,
    ConnectionLost,
    ConnectRefused,
    MQTTLiteClient,
    ProtocolError,
    encode_remaining_length,
)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
WAIT = 10.0  # upper bound for event waits; tests finish as soon as the event happens


def _broker_config(allow_anonymous: bool = True) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}},
    }


@contextlib.asynccontextmanager
async def running_broker(allow_anonymous: bool = True) -> AsyncIterator[tuple[Broker, int]]:
    """Start an amqtt broker on an ephemeral port; shut it down unless the test already did."""
    broker = Broker(_broker_config(allow_anonymous))
    await broker.start()
    server = broker._servers["default"].instance
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    try:
        yield broker, port
    finally:
        if broker.transitions.state == "started":
            await broker.shutdown()


@pytest_asyncio.fixture
async def port() -> AsyncIterator[int]:
    async with running_broker() as (_, p):
        yield p


class Inbox:
    """on_message target that lets tests await deliveries."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.queue.put_nowait((topic, payload))

    async def get(self) -> tuple[str, bytes]:
        return await asyncio.wait_for(self.queue.get(), WAIT)


class DisconnectRecorder:
    """on_disconnect target that records every call."""

    def __init__(self) -> None:
        self.calls: list[BaseException | None] = []
        self.fired = asyncio.Event()

    def __call__(self, exc: BaseException | None) -> None:
        self.calls.append(exc)
        self.fired.set()

    async def wait(self) -> BaseException | None:
        await asyncio.wait_for(self.fired.wait(), WAIT)
        return self.calls[0]


# ---- pure framing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_boundaries(n: int, encoded: bytes) -> None:
    assert encode_remaining_length(n) == encoded


def test_remaining_length_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_remaining_length(268_435_456)
    with pytest.raises(ValueError):
        encode_remaining_length(-1)


# ---- against amqtt ------------------------------------------------------------


async def test_connect_connack_and_clean_disconnect(port: int) -> None:
    rec = DisconnectRecorder()
    c = MQTTLiteClient(on_disconnect=rec)
    assert not c.connected
    assert await c.connect("127.0.0.1", port, "dev-1") == 0
    assert c.connected
    await c.disconnect()
    assert not c.connected
    assert await rec.wait() is None
    await asyncio.wait_for(c.wait_closed(), WAIT)
    await c.disconnect()  # idempotent
    assert rec.calls == [None]
    with pytest.raises(ConnectionLost):
        await c.publish("a/b", b"x")


async def test_subscribe_publish_qos0_and_qos1_round_trip(port: int) -> None:
    inbox = Inbox()
    sub, pub = MQTTLiteClient(on_message=inbox), MQTTLiteClient()
    await sub.connect("127.0.0.1", port, "sub")
    await pub.connect("127.0.0.1", port, "pub")
    assert await sub.subscribe("devices/+/cmd", qos=1) == 1
    assert await sub.subscribe("devices/+/q0", qos=0) == 0

    await pub.publish("devices/d1/q0", b"zero", qos=0)
    assert await inbox.get() == ("devices/d1/q0", b"zero")
    await pub.publish("devices/d1/cmd", "one", qos=1)  # str payload is UTF-8 encoded; returns after PUBACK
    assert await inbox.get() == ("devices/d1/cmd", b"one")
    # Many QoS 1 publishes in flight at once exercise packet-id bookkeeping and ordering.
    await asyncio.gather(*(pub.publish("devices/d2/cmd", str(i), qos=1) for i in range(50)))
    got = sorted([int((await inbox.get())[1]) for _ in range(50)])
    assert got == list(range(50))
    assert not pub._pending  # every ack future was released
    await sub.unsubscribe("devices/+/cmd")
    await pub.disconnect()
    await sub.disconnect()


async def test_async_on_message_is_awaited(port: int) -> None:
    done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0)
        done.set_result(payload)

    c = MQTTLiteClient(on_message=handler)
    await c.connect("127.0.0.1", port, "async-cb")
    await c.subscribe("x/y", qos=1)
    await c.publish("x/y", b"hi", qos=1)
    assert await asyncio.wait_for(done, WAIT) == b"hi"
    await c.disconnect()


@pytest.mark.parametrize("size", [200, 20_000, 2_200_000])  # 2-, 3- and 4-byte remaining length
async def test_large_payload_round_trip(port: int, size: int) -> None:
    inbox = Inbox()
    sub, pub = MQTTLiteClient(on_message=inbox), MQTTLiteClient()
    await sub.connect("127.0.0.1", port, "big-sub")
    await pub.connect("127.0.0.1", port, "big-pub")
    await sub.subscribe("fw/blob", qos=1)
    payload = bytes(range(256)) * (size // 256) + b"\xab" * (size % 256)
    await pub.publish("fw/blob", payload, qos=1)
    topic, got = await inbox.get()
    assert topic == "fw/blob"
    assert len(got) == size
    assert got == payload
    await pub.disconnect()
    await sub.disconnect()


async def test_refused_connect_surfaces_code() -> None:
    async with running_broker(allow_anonymous=False) as (_, p):
        rec = DisconnectRecorder()
        c = MQTTLiteClient(on_disconnect=rec)
        with pytest.raises(ConnectRefused) as ei:
            await c.connect("127.0.0.1", p, "anon")
        assert ei.value.code == 5  # not authorized
        assert not c.connected
        assert rec.calls == []  # never connected, so never "lost"

        quiet = MQTTLiteClient(raise_on_refuse=False)
        assert await quiet.connect("127.0.0.1", p, "anon2") == 5
        assert not quiet.connected

        # With a user name the same plugin accepts: proves the user/password fields are framed right.
        named = MQTTLiteClient()
        assert await named.connect("127.0.0.1", p, "named", username="dev", password="pw") == 0
        await named.disconnect()


async def test_on_disconnect_fires_when_broker_closes() -> None:
    async with running_broker() as (broker, p):
        rec = DisconnectRecorder()
        c = MQTTLiteClient(on_disconnect=rec)
        await c.connect("127.0.0.1", p, "victim")
        await broker.shutdown()
        exc = await rec.wait()
        assert isinstance(exc, ConnectionLost)
        assert not c.connected
        await asyncio.wait_for(c.wait_closed(), WAIT)
        assert len(rec.calls) == 1


async def test_client_close_aborts_without_disconnect(port: int) -> None:
    rec = DisconnectRecorder()
    c = MQTTLiteClient(on_disconnect=rec)
    await c.connect("127.0.0.1", port, "dropper")
    pending = asyncio.ensure_future(c.subscribe("never/acked", 1))
    c.close()
    assert await rec.wait() is None
    with pytest.raises(ConnectionLost):
        await pending
    # The same object can reconnect, as the fleet simulator does after a simulated outage.
    assert await c.connect("127.0.0.1", port, "dropper") == 0
    await c.disconnect()
    assert rec.calls == [None, None]


class PingCountingClient(MQTTLiteClient):
    """Counts PINGRESPs so the test can wait on real keepalive traffic."""

    __slots__ = ("pongs",)

    def __init__(self) -> None:
        super().__init__()
        self.pongs: asyncio.Queue[float] = asyncio.Queue()

    def _dispatch(self, first: int, body: bytes) -> None:
        if first == PINGRESP:
            self.pongs.put_nowait(asyncio.get_running_loop().time())
        super()._dispatch(first, body)


async def test_keepalive_ping_keeps_idle_client_connected(port: int) -> None:
    loop = asyncio.get_running_loop()
    inbox = Inbox()
    c = PingCountingClient()
    c.on_message = inbox
    start = loop.time()
    await c.connect("127.0.0.1", port, "idle", keepalive=1)
    await c.subscribe("idle/t")
    # Idle past 1.5 x keepalive, but by waiting on PINGRESPs (one per 0.75 s) rather than sleeping.
    pongs = 0
    while loop.time() - start < 1.6:
        await asyncio.wait_for(c.pongs.get(), WAIT)
        pongs += 1
    assert pongs >= 2
    assert c.connected
    await c.publish("idle/t", b"still here", qos=1)
    assert await inbox.get() == ("idle/t", b"still here")
    await c.disconnect()


async def test_200_clients_connect_concurrently(port: int) -> None:
    clients = [MQTTLiteClient() for _ in range(200)]
    codes = await asyncio.gather(*(c.connect("127.0.0.1", port, f"fleet-{i}") for i, c in enumerate(clients)))
    assert codes == [0] * 200
    assert all(c.connected for c in clients)
    await asyncio.gather(*(c.disconnect() for c in clients))
    assert not any(c.connected for c in clients)


# ---- raw fake broker: byte-level edge cases amqtt will not produce ---------------


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(length)


def _pkt(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


def _publish(topic: str, payload: bytes, qos: int = 0, pid: int = 0, dup: bool = False) -> bytes:
    t = topic.encode()
    vh = struct.pack("!H", len(t)) + t + (struct.pack("!H", pid) if qos else b"")
    return _pkt(0x30 | (qos << 1) | (0x08 if dup else 0), vh + payload)


@contextlib.asynccontextmanager
async def fake_broker() -> AsyncIterator[tuple[int, asyncio.Queue[Conn]]]:
    """A listening socket whose accepted connections the test drives by hand."""
    conns: asyncio.Queue[Conn] = asyncio.Queue()
    writers: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        await conns.put((r, w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], conns
    finally:
        for w in writers:
            w.transport.abort()
        server.close()
        await server.wait_closed()


async def _accept(conns: asyncio.Queue[Conn]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    r, w = await asyncio.wait_for(conns.get(), WAIT)
    first, body = await _read_packet(r)
    assert first == 0x10
    w.write(b"\x20\x02\x00\x00")
    return r, w, body


async def test_connect_packet_layout_and_pid_wrap() -> None:
    async with fake_broker() as (p, conns):
        c = MQTTLiteClient()
        task = asyncio.ensure_future(
            c.connect("127.0.0.1", p, "id-é", username="u", password=b"\x00p", clean_session=False, keepalive=30)
        )
        _, _, body = await _accept(conns)
        assert await task == 0
        cid = "id-é".encode()
        expected = b"\x00\x04MQTT\x04" + bytes((0xC0,)) + struct.pack("!H", 30)
        expected += struct.pack("!H", len(cid)) + cid + b"\x00\x01u" + b"\x00\x02\x00p"
        assert body == expected
        c._pid = 65534
        assert c._new_pending()[0] == 65535
        assert c._new_pending()[0] == 1  # wraps past 65535, never uses 0
        del c._pending[1]
        c._pid = 65534
        assert c._new_pending()[0] == 1  # 65535 is still in flight, so it is skipped
        c._pending.clear()  # nobody awaits these futures; don't fail them on close
        c.close()


async def test_partial_reads_coalesced_packets_and_qos_acks() -> None:
    async with fake_broker() as (p, conns):
        inbox = Inbox()
        c = MQTTLiteClient(on_message=inbox)
        task = asyncio.ensure_future(c.connect("127.0.0.1", p, "raw"))
        r, w, _ = await _accept(conns)
        await task
        # Two packets in one write.
        w.write(_publish("a", b"1") + _publish("b", b"2"))
        assert await inbox.get() == ("a", b"1")
        assert await inbox.get() == ("b", b"2")
        # A 3-byte remaining length dribbled in one byte at a time.
        big = _publish("c", b"z" * 20_000)
        for i in range(0, 8):
            w.write(big[i : i + 1])
            await w.drain()
            await asyncio.sleep(0.001)  # let the client see each fragment separately
        w.write(big[8:])
        assert await inbox.get() == ("c", b"z" * 20_000)
        # Incoming QoS 1 is PUBACKed.
        w.write(_publish("q1", b"x", qos=1, pid=7))
        assert await inbox.get() == ("q1", b"x")
        assert await asyncio.wait_for(_read_packet(r), WAIT) == (0x40, b"\x00\x07")
        # Incoming QoS 2: PUBREC, a DUP resend is not redelivered, PUBREL -> PUBCOMP.
        w.write(_publish("q2", b"y", qos=2, pid=9))
        assert await inbox.get() == ("q2", b"y")
        assert await asyncio.wait_for(_read_packet(r), WAIT) == (0x50, b"\x00\x09")
        w.write(_publish("q2", b"y", qos=2, pid=9, dup=True))
        assert await asyncio.wait_for(_read_packet(r), WAIT) == (0x50, b"\x00\x09")
        w.write(b"\x62\x02\x00\x09")
        assert await asyncio.wait_for(_read_packet(r), WAIT) == (0x70, b"\x00\x09")
        assert inbox.queue.empty()
        c.close()


async def test_missing_pingresp_drops_connection() -> None:
    async with fake_broker() as (p, conns):
        rec = DisconnectRecorder()
        c = MQTTLiteClient(on_disconnect=rec)
        task = asyncio.ensure_future(c.connect("127.0.0.1", p, "deaf", keepalive=1))
        r, _, _ = await _accept(conns)
        await task
        assert await asyncio.wait_for(_read_packet(r), WAIT) == (0xC0, b"")  # PINGREQ, never answered
        exc = await rec.wait()
        assert isinstance(exc, ConnectionLost)
        assert "PINGRESP" in str(exc)


async def test_on_message_exception_ends_connection() -> None:
    async with fake_broker() as (p, conns):
        rec = DisconnectRecorder()

        def boom(topic: str, payload: bytes) -> None:
            raise RuntimeError("handler bug")

        c = MQTTLiteClient(on_message=boom, on_disconnect=rec)
        task = asyncio.ensure_future(c.connect("127.0.0.1", p, "buggy"))
        _, w, _ = await _accept(conns)
        await task
        w.write(_publish("t", b"x"))
        exc = await rec.wait()
        assert isinstance(exc, RuntimeError)
        assert not c.connected


async def test_garbage_from_broker_is_a_protocol_error() -> None:
    async with fake_broker() as (p, conns):
        rec = DisconnectRecorder()
        c = MQTTLiteClient(on_disconnect=rec)
        task = asyncio.ensure_future(c.connect("127.0.0.1", p, "g"))
        _, w, _ = await _accept(conns)
        await task
        w.write(b"\x20\x02\x00\x00")  # a second CONNACK is illegal
        assert isinstance(await rec.wait(), ProtocolError)


async def test_connect_times_out_without_connack() -> None:
    async with fake_broker() as (p, conns):
        c = MQTTLiteClient()
        with pytest.raises(TimeoutError):
            await c.connect("127.0.0.1", p, "slow", timeout=0.2)
        assert not c.connected
        r, _ = await asyncio.wait_for(conns.get(), WAIT)
        await _read_packet(r)  # the CONNECT did arrive
        assert await asyncio.wait_for(r.read(), WAIT) == b""  # and the client hung up


async def test_connection_closed_before_connack_is_a_connection_error() -> None:
    # What a TCP balancer does when the server it picked has just died: accept, then hang up.
    # An OSError, so reconnect loops treat it like a refused connect and try again.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_packet(reader)  # the CONNECT, read: the close is a clean FIN, not a reset
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        c = MQTTLiteClient()
        with pytest.raises(ConnectionResetError, match="before CONNACK"):
            await c.connect("127.0.0.1", port, "unlucky")
        assert not c.connected
    finally:
        server.close()
        await server.wait_closed()

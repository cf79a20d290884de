"""Hostile MQTT input: raw frames a client library would never send. Each costs the attacker its
connection and the server nothing: no traceback per packet, no unbounded memory, no hang."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.conftest import Server, credentials, wait_for
from tests.test_broker import _connect, _mqtt_str, _packet, _publish

MAX_PACKET = 64 * 1024


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"mqtt_max_packet_bytes": MAX_PACKET}


async def logged_in(server: Server, dk: str = "d1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    dev = await server.device(dk)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    creds = credentials("pk1", dk, dev["deviceSecret"])
    writer.write(_connect(creds["identifier"], creds["username"], creds["password"]))
    assert (await reader.readexactly(4))[3] == 0
    return reader, writer


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True once the server has closed the connection (whatever it sent before)."""
    async with asyncio.timeout(timeout):
        while await reader.read(65536):
            pass
    return True


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x36, 0x05]) + _mqtt_str("t") + b"abc",  # PUBLISH with QoS 3
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),  # remaining length over 4 bytes
        bytes([0x82, 0x02, 0x00, 0x01]),  # SUBSCRIBE without a single filter
        bytes([0x62, 0x00]),  # PUBREL without its packet id
    ],
    ids=["qos3", "bad-length", "empty-subscribe", "short-pubrel"],
)
async def test_a_malformed_packet_closes_the_connection_without_a_traceback(
    server: Server, caplog: pytest.LogCaptureFixture, frame: bytes
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await logged_in(server)
    writer.write(frame)
    assert await closed(reader)
    writer.close()
    assert not tracebacks(caplog), [r.getMessage() for r in tracebacks(caplog)]
    # The server goes on serving others.
    r2, w2 = await logged_in(server, "d2")
    w2.write(_publish("/sys/pk1/d2/ota/device/inform", b'{"id":"1","params":{"version":"1"}}'))
    head = await r2.readexactly(2)
    assert b"inform_reply" in await r2.readexactly(head[1])
    w2.close()


async def test_an_mqtt5_connect_gets_a_connack_saying_the_version_is_unacceptable(server: Server) -> None:
    dev = await server.device("d1")
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    # MQTT 5: protocol level 5 and a properties length (0) after the keep-alive.
    var = _mqtt_str("MQTT") + bytes([5, 0xC2]) + (60).to_bytes(2, "big") + b"\x00"
    body = var + _mqtt_str(creds["identifier"]) + _mqtt_str(creds["username"]) + _mqtt_str(creds["password"])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    writer.write(_packet(0x10, body))
    async with asyncio.timeout(2):  # well before the connect timeout
        connack = await reader.readexactly(4)
    assert connack[0] == 0x20 and connack[3] == 0x01  # 0x01: unacceptable protocol version
    assert await closed(reader)
    writer.close()


async def test_a_packet_over_the_limit_is_refused_from_its_header(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await logged_in(server)
    # Claims 100 MB; only the header and a little of the body ever arrive.
    writer.write(bytes([0x30]) + _length(100 * 1024 * 1024) + _mqtt_str("/sys/pk1/d1/x") + b"x" * 1000)
    assert await closed(reader, timeout=2)  # the server does not wait for the 100 MB
    writer.close()
    assert any("over the limit" in r.getMessage() for r in caplog.records)
    assert not tracebacks(caplog)


async def test_a_packet_under_the_limit_still_goes_through(server: Server) -> None:
    reader, writer = await logged_in(server)
    payload = b'{"id":"1","params":{"version":"1"},"pad":"' + b"x" * (MAX_PACKET - 200) + b'"}'
    writer.write(_publish("/sys/pk1/d1/ota/device/inform", payload))
    head = await reader.readexactly(2)
    assert b"inform_reply" in await reader.readexactly(head[1])
    writer.close()


async def test_retained_messages_are_not_kept(server: Server) -> None:
    reader, writer = await logged_in(server)
    retained = _packet(0x31, _mqtt_str("/sys/pk1/d1/state") + b"x" * 10_000)  # PUBLISH, retain, QoS 0
    for _ in range(50):
        writer.write(retained)
    writer.write(_publish("/sys/pk1/d1/ota/device/inform", b'{"id":"1","params":{"version":"1"}}'))
    head = await reader.readexactly(2)
    assert b"inform_reply" in await reader.readexactly(head[1])
    writer.close()
    broker = server.app.broker
    assert broker is not None

    async def gone() -> bool:
        return "pk1/d1" not in broker.sessions or not broker.sessions["pk1/d1"][0].transitions.is_connected()

    await wait_for(gone)
    assert not broker.retained_messages


def _length(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n % 128, n // 128
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out

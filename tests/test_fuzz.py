"""Property-based fuzzing (Hypothesis) of what devices send: raw MQTT frames, the protocol's parsers
and the server's device-message handlers, on a real server with a real store and a job in flight.

Whatever the bytes, a handler answers with standard JSON and a code a device can act on (200,
400 or 404: never 500, which would mean the server failed), logs no traceback, and the device
stays servable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otabox import protocol
from otabox.server.app import App
from tests.conftest import TOKEN, Server, credentials, start_server
from tests.test_broker import _connect, _mqtt_str
from tests.test_mqtt_hostile import _length

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_ANY = st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
# Requests as devices shape them, with any value where a field goes (NaN and Infinity included:
# json.dumps writes them, and so do careless device libraries).
FIELD = JSON_LEAF | st.sampled_from(["", "2.0", "-3", "100", "1e999", "NaN", "35", "x" * 300])
REQUEST = st.fixed_dictionaries(
    {"id": JSON_LEAF, "params": st.dictionaries(st.sampled_from(["version", "step", "desc", "x"]), FIELD)},
    optional={"version": JSON_LEAF, "method": JSON_LEAF},
)
PAYLOAD = st.one_of(
    st.binary(max_size=200),
    JSON_ANY.map(lambda v: json.dumps(v).encode()),
    REQUEST.map(lambda v: json.dumps(v).encode()),
)
SUFFIXES = st.sampled_from(sorted(protocol.DEVICE_TOPICS))


class Tap:
    """The outbox, recording what the handlers send the device (replies, pushes)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[tuple[str, bytes]] = []

    def deliver(self, product_key: str, device_key: str, suffix: str, payload: bytes, qos: int = 1) -> bool:
        self.sent.append((suffix, payload))
        return bool(self.inner.deliver(product_key, device_key, suffix, payload, qos))

    def deliver_to(self, product_key: str, device_key: str, topic: str, payload: bytes, qos: int = 1) -> bool:
        self.sent.append((topic, payload))
        return bool(self.inner.deliver_to(product_key, device_key, topic, payload, qos))

    async def disconnect(self, product_key: str, device_key: str, certificate: str | None = None) -> bool:
        return bool(await self.inner.disconnect(product_key, device_key, certificate))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.Runner, App, Tap]]:
    """One server for every example (a server per example would be most of the run), in a loop
    of its own: Hypothesis drives plain functions, so each example runs its coroutine there."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with asyncio.Runner() as runner:
        app = runner.run(start_server(tmp, scheduler_interval=0.1))
        runner.run(_job_in_flight(app, tmp))
        assert app.gateway is not None
        tap = Tap(app.gateway.sender)
        app.gateway.sender = tap
        try:
            yield runner, app, tap
        finally:
            runner.run(app.stop())


async def _job_in_flight(app: App, tmp: Path) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        server = Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp / "data")
        _SECRETS[id(app)] = (await server.device("d1"))["deviceSecret"]
        fw = await server.firmware("pk1", "2.0", b"\x01" * 1000)
        await server.call(
            "POST", "/jobs", 201, json={"firmwareId": fw["id"], "mode": "request", "retry": {"count": 100}}
        )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=SUFFIXES, payload=PAYLOAD)
def test_device_messages_never_cost_a_500_or_a_traceback(
    running: tuple[asyncio.Runner, App, Tap], caplog: pytest.LogCaptureFixture, suffix: str, payload: bytes
) -> None:
    runner, app, tap = running
    assert app.gateway is not None
    caplog.clear()
    tap.sent.clear()
    with caplog.at_level(logging.WARNING):
        runner.run(app.gateway.device_message("pk1", "d1", suffix, payload))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    for sent_suffix, body in tap.sent:
        reply = json.loads(body, parse_constant=_refuse)  # standard JSON only: no NaN, no Infinity
        if sent_suffix.endswith("_reply"):
            assert reply["code"] in (200, 400, 404), (suffix, payload, reply)
            if reply["code"] == 400:
                assert reply.get("message"), reply


@settings(max_examples=1000, deadline=None)
@given(payload=st.binary(max_size=300) | JSON_ANY.map(lambda v: json.dumps(v).encode()))
def test_the_protocol_parsers_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        req = protocol.parse_request(payload)
    except protocol.ProtocolError:
        return
    for parse in (protocol.parse_version, protocol.parse_progress):
        try:
            parse(req.params)
        except protocol.ProtocolError:
            pass
    protocol.request_id(payload)  # never raises
    try:
        protocol.reply_code(payload)
    except protocol.ProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(client_id=st.none() | st.text(max_size=80), username=st.none() | st.text(max_size=80))
def test_login_parsing_raises_only_protocol_errors(client_id: str | None, username: str | None) -> None:
    try:
        protocol.parse_login(client_id, username)
    except protocol.ProtocolError:
        pass


def _refuse(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name} in a reply")


FRAME = st.one_of(
    # Any first byte, a truthful length and any body: every packet type with junk inside.
    st.tuples(st.integers(0, 255), st.binary(max_size=300)).map(lambda t: bytes([t[0]]) + _length(len(t[1])) + t[1]),
    st.binary(min_size=1, max_size=300),  # anything at all, lengths included
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=FRAME)
def test_mqtt_frames_from_a_logged_in_device_cost_no_traceback(
    running: tuple[asyncio.Runner, App, Tap], caplog: pytest.LogCaptureFixture, frame: bytes
) -> None:
    runner, app, _tap = running
    caplog.clear()
    with caplog.at_level(logging.INFO):
        runner.run(_send_frame(app, frame))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


async def _send_frame(app: App, frame: bytes) -> None:
    """Log in as d1, send `frame`, then check a fresh connection of d1 is served (its inform answered)."""
    for payload in (frame, None):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.mqtt_port)
        writer.write(_login_frame(app))
        assert (await reader.readexactly(4))[3] == 0
        if payload is not None:
            writer.write(payload)
            await writer.drain()
            await asyncio.sleep(0)  # let the server read it
        else:
            inform = _mqtt_str("/sys/pk1/d1/ota/device/inform") + b'{"id":"1","params":{"version":"1.0"}}'
            writer.write(bytes([0x30]) + _length(len(inform)) + inform)
            async with asyncio.timeout(10):
                while True:  # skip whatever else the server sends (a push of the job in flight)
                    head = await reader.readexactly(1)
                    size, shift = 0, 0
                    while True:
                        b = (await reader.readexactly(1))[0]
                        size |= (b & 0x7F) << shift
                        shift += 7
                        if not b & 0x80:
                            break
                    body = await reader.readexactly(size)
                    if head[0] >> 4 == 3 and b"inform_reply" in body:
                        break
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


_SECRETS: dict[int, str] = {}


def _login_frame(app: App) -> bytes:
    creds = credentials("pk1", "d1", _SECRETS[id(app)])
    return _connect(creds["identifier"], creds["username"], creds["password"])

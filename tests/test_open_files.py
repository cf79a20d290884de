"""A server at its open-files limit: more devices knock than it has descriptors for. It logs that
it is out of open files a few times, not a traceback per refused accept (asyncio's own handler
logged up to 4,096 per wake-up), and serves again once the connections are gone. Before that
limit, `mqtt_max_connections` refuses connections at once, keeping descriptors for the rest."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TOKEN, Server, credentials, serve_command, wait_for
from tests.test_broker import _connect

LIMIT = 96  # the server's whole budget of descriptors (it starts with about 30 open)
KNOCKS = 300
CAP = 2  # mqtt_max_connections of the in-process server


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"mqtt_max_connections": CAP}


async def _login(server: Server, dk: str, secret: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    secret = secret or (await server.device(dk))["deviceSecret"]
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    creds = credentials("pk1", dk, secret)
    writer.write(_connect(creds["identifier"], creds["username"], creds["password"]))
    assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
    return reader, writer


async def test_connections_over_the_cap_are_closed_at_once(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """The node at its MQTT cap hands a new socket back before reading from it: no CONNACK, no
    descriptor held until the connect timeout; one warning; the devices already in are served."""
    caplog.set_level(logging.WARNING, logger="otabox.server.mqtt.broker")
    broker = server.app.broker
    assert broker is not None
    held = [await _login(server, f"d{i}") for i in range(CAP)]
    extra = await server.device("d-extra")
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        creds = credentials("pk1", "d-extra", extra["deviceSecret"])
        writer.write(_connect(creds["identifier"], creds["username"], creds["password"]))
        async with asyncio.timeout(5):  # well under the connect timeout: closed, not left waiting
            try:
                assert await reader.read() == b""
            except ConnectionResetError:
                pass  # aborted: the kernel may answer what we sent with a reset
        writer.close()
    assert broker.connections_refused == 3
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "mqtt_max_connections 2" in warnings[0], warnings
    assert (await server.call("GET", "/products/pk1/devices/d0", 200))["online"] is True
    # One leaves: there is room again.
    held[0][1].close()

    async def room() -> bool:
        return sum(int(s.conn_count) for s in broker._servers.values()) < CAP

    await wait_for(room, timeout=10)
    reader, writer = await _login(server, "d-extra", extra["deviceSecret"])
    writer.close()
    for _, w in held[1:]:
        w.close()


async def test_running_out_of_open_files_is_a_few_warnings_and_passes(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *serve_command(tmp_path / "data", "--connect-timeout", "2", "--mqtt-max-connections", "1000"),
            env={**os.environ, "OTABOX_ADMIN_TOKEN": TOKEN},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
            preexec_fn=_low_limit,
        )
    socks: list[socket.socket] = []
    try:
        ports_file = tmp_path / "data" / "ports.json"

        async def ready() -> bool:
            assert proc.returncode is None, log.read_text()
            return ports_file.exists()

        await wait_for(ready, timeout=30)
        ports = json.loads(ports_file.read_text())
        # Raw TCP connections, no CONNECT: the kernel completes them from the listen queue
        # whether or not the server can accept them.
        for _ in range(KNOCKS):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", ports["mqtt"]))
            except BlockingIOError:
                pass
            socks.append(s)

        async def refused() -> bool:  # the server ran out of descriptors and said so
            return "open files exhausted" in log.read_text(errors="replace")

        await wait_for(refused, timeout=15)
        # A duration, not an event: three more of asyncio's one-second accept retries, all
        # within one 10 s report of the quieter handler (stock logs each retry's failures).
        await asyncio.sleep(3)
        for s in socks:
            s.close()
        socks.clear()

        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{ports['http']}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        assert await wait_for(healthy, timeout=20)  # serving again
        text = log.read_text(errors="replace")
        # Without the quieter handler: ~70,000 lines of "out of system resource" in those 4 s.
        assert 1 <= text.count("open files exhausted") <= 3, text[-3000:]
        assert text.count("Traceback") == 0 and "out of system resource" not in text.replace(
            "open files exhausted", ""
        ), text[-3000:]
    finally:
        for s in socks:
            s.close()
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()

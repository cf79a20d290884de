"""`python -m otabox serve` as a real process: ports.json, the admin token, signals, restarts, data at rest."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from otabox import __version__, protocol
from tests.conftest import Server, credentials, next_message, serve_command

START_TIMEOUT = 30.0  # a cold interpreter importing amqtt and aiohttp on a busy CI machine
STOP_TIMEOUT = 10.0
TOKEN_RE = re.compile(r"Admin token \(shown once, only its hash is stored\): (\S+)")


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    data_dir: Path
    log: Path
    lines: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    http_port: int = 0
    mqtt_port: int = 0
    reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.lines.append(line)
            if line.startswith(f"otabox {__version__}: HTTP"):
                self.ready.set()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig` and wait for the exit code (bounded)."""
        self.proc.send_signal(sig)
        async with asyncio.timeout(STOP_TIMEOUT):
            rc = await self.proc.wait()
            if self.reader is not None:
                await self.reader
        return rc

    async def api(self, method: str, path: str, token: str, expect: int, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + "/api/v1" + path, headers=headers, **kw) as resp,
        ):
            body = await resp.read()
            assert resp.status == expect, (resp.status, body)
            return json.loads(body) if "json" in resp.content_type else body


class Launcher:
    """Starts `python -m otabox serve` processes and ends any still running at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    async def start(self, data_dir: Path, env: dict[str, str] | None = None) -> Proc:
        # A stale ports.json from an earlier run would point at a dead port.
        (data_dir / "ports.json").unlink(missing_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("OTABOX_")}
        log = self.tmp_path / f"serve-{len(self.procs)}.log"
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *serve_command(data_dir),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                stdin=asyncio.subprocess.DEVNULL,
                env={**base, **(env or {})},
                cwd=self.tmp_path,
            )
        p = Proc(proc, data_dir, log)
        self.procs.append(p)
        p.reader = asyncio.create_task(p._read())
        ports_file = data_dir / "ports.json"
        try:
            async with asyncio.timeout(START_TIMEOUT):
                # ports.json is written by another process: poll it, bounded.
                while not ports_file.exists():
                    assert proc.returncode is None, f"serve exited {proc.returncode}:\n{p.stderr()}"
                    await asyncio.sleep(0.05)
                await p.ready.wait()
        except TimeoutError:
            raise AssertionError(f"serve did not start within {START_TIMEOUT}s:\n{p.stderr()}") from None
        ports = json.loads(ports_file.read_text())
        assert set(ports) == {"http", "mqtt"} and all(isinstance(v, int) and v > 0 for v in ports.values())
        p.http_port, p.mqtt_port = ports["http"], ports["mqtt"]
        async with aiohttp.ClientSession() as http, http.get(p.url + "/healthz") as resp:
            assert resp.status == 200
            health = await resp.json()
        assert health["status"] == "ok" and health["httpPort"] == p.http_port and health["mqttPort"] == p.mqtt_port
        return p

    async def close(self) -> None:
        for p in self.procs:
            if p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()
            if p.reader is not None:
                await p.reader


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    await launcher.close()


async def device_reports(port: int, pk: str, dk: str, secret: str, version: str) -> dict[str, Any]:
    """Log in over MQTT the EnOS way, report `version`, return the inform reply."""
    creds = credentials(pk, dk, secret)
    async with aiomqtt.Client("127.0.0.1", port, timeout=10, **creds) as c:
        await c.publish(
            protocol.topic_for(pk, dk, protocol.INFORM),
            json.dumps({"id": "1", "version": "1.0", "method": "ota.device.inform", "params": {"version": version}}),
            qos=1,
        )
        return await next_message(c, protocol.INFORM + "_reply")


def data_files_bytes(data_dir: Path) -> bytes:
    """The database with its WAL and shared-memory files, as stored."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("otabox.db*")))


async def test_first_start_restart_and_signals(launcher: Launcher, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = await launcher.start(data_dir)
    found = TOKEN_RE.findall(first.stdout)
    assert len(found) == 1, first.stdout
    token = found[0]
    assert first.stdout.count(token) == 1
    assert "127.0.0.1" in first.stdout and str(first.http_port) in first.stdout

    await first.api("GET", "/products", "not-the-token", 401)
    assert await first.api("GET", "/products", token, 200) == {"items": [], "total": 0}
    await first.api("POST", "/products", token, 201, json={"productKey": "pk1", "name": "Thermostat"})
    dev = await first.api("POST", "/products/pk1/devices", token, 201, json={"deviceKey": "d1"})
    secret = dev["deviceSecret"]
    form = aiohttp.FormData()
    form.add_field("name", "main")
    form.add_field("version", "2.0.0")
    form.add_field("file", b"firmware-bytes" * 1000, filename="fw.bin")
    fw = await first.api("POST", "/products/pk1/firmware", token, 201, data=form)

    reply = await device_reports(first.mqtt_port, "pk1", "d1", secret, "1.0.0")
    assert reply == {"id": "1", "code": 200, "data": {}}
    shown = await first.api("GET", "/products/pk1/devices/d1", token, 200)
    assert shown["version"] == "1.0.0"
    # The secret is encrypted at rest, never logged.
    assert secret.encode() not in data_files_bytes(data_dir)
    assert secret not in first.stdout and secret not in first.stderr()

    assert await first.stop(signal.SIGTERM) == 0
    assert token not in first.stderr()
    assert secret.encode() not in data_files_bytes(data_dir)

    second = await launcher.start(data_dir)
    assert "Admin token" not in second.stdout and not TOKEN_RE.search(second.stdout)
    # The old token, the data and the device secret all survive the restart.
    products = await second.api("GET", "/products", token, 200)
    assert [(p["productKey"], p["name"], p["devices"]) for p in products["items"]] == [("pk1", "Thermostat", 1)]
    shown = await second.api("GET", "/products/pk1/devices/d1", token, 200)
    assert shown["version"] == "1.0.0" and shown["online"] is False
    assert await second.api("GET", f"/firmware/{fw['id']}", token, 200) == fw
    url = (await second.api("GET", f"/firmware/{fw['id']}/url?deviceKey=d1", token, 200))["fileUrl"]
    assert url.startswith(second.url + "/firmware/")
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == b"firmware-bytes" * 1000
    reply = await device_reports(second.mqtt_port, "pk1", "d1", secret, "1.0.1")
    assert reply["code"] == 200
    assert (await second.api("GET", "/products/pk1/devices/d1", token, 200))["version"] == "1.0.1"

    assert await second.stop(signal.SIGINT) == 0


async def test_admin_token_from_environment(launcher: Launcher, tmp_path: Path) -> None:
    proc = await launcher.start(tmp_path / "data", env={"OTABOX_ADMIN_TOKEN": "chosen-token-123"})
    assert "Admin token" not in proc.stdout and "chosen-token-123" not in proc.stdout
    assert await proc.api("GET", "/products", "chosen-token-123", 200) == {"items": [], "total": 0}
    await proc.api("GET", "/products", "another-token", 401)
    assert await proc.stop(signal.SIGTERM) == 0
    assert "chosen-token-123" not in proc.stderr()


async def test_secret_encrypted_at_rest_and_private_permissions(server: Server) -> None:
    secret = "plain-text-secret-0123456789"
    await server.device("d1", deviceSecret=secret)
    await server.device("d2", deviceSecret="other-secret-" + "x" * 20, auth="plain")
    db = data_files_bytes(server.data_dir)
    assert b"d1" in db  # the device is there...
    assert secret.encode() not in db and b"other-secret-" not in db  # ...its secret is not
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((server.data_dir / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((server.data_dir / "ports.json").stat().st_mode) == 0o600

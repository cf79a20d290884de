"""Shared fixtures: a real otabox server on port 0, real HTTP, real MQTT devices."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import hypothesis
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from otabox import protocol
from otabox.server.app import App
from otabox.server.mqtt.device_hooks import DeviceGateway
from otabox.server.services import Services
from otabox.server.settings import Settings
from otabox.server.store import Store
from tests.enos_venv import EnosVenvError, ensure_enos_venv

# A real PostgreSQL (scripts/postgres) and the store fixtures run on each backend: tests/postgres.py;
# a real S3 server (scripts/s3, SeaweedFS): tests/s3.py.
pytest_plugins = ("tests.postgres", "tests.s3")

TOKEN = "test-admin-token"

# Hypothesis (tests/test_fuzz.py): the suite runs the same examples every time, so a run is never
# red by luck; HYPOTHESIS_PROFILE=explore draws new ones (and keeps failures in .hypothesis/).
hypothesis.settings.register_profile("suite", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@dataclass
class Server:
    """A running server, driven over HTTP: in this process (`local_app`, the `server` fixture)
    or in another one (`local_app=None`, its MQTT port in `mqtt`)."""

    local_app: App | None
    http: aiohttp.ClientSession
    url: str
    data_dir: Path
    products: set[str] = field(default_factory=set)
    mqtt: int | None = None  # for a server in another process (no App object here)

    @property
    def app(self) -> App:
        """The in-process App; only the `server` fixture has one."""
        assert self.local_app is not None, "this server runs in another process"
        return self.local_app

    @property
    def services(self) -> Services:
        """The started App's services."""
        services = self.app.services
        assert services is not None, "server not started"
        return services

    @property
    def store(self) -> Store:
        store = self.app.store
        assert store is not None, "server not started"
        return store

    @property
    def gateway(self) -> DeviceGateway:
        """The MQTT device gateway (tests swap its `jobs` hooks for a Recorder)."""
        gateway = self.app.gateway
        assert gateway is not None, "server not started"
        return gateway

    @property
    def mqtt_port(self) -> int:
        port = self.mqtt if self.mqtt is not None else self.app.mqtt_port
        assert port is not None, "plain MQTT is off"
        return port

    async def call(self, method: str, path: str, expect: int | None = None, **kw: Any) -> Any:
        async with self.http.request(method, self.url + "/api/v1" + path, **kw) as resp:
            body = await resp.read()
            data = json.loads(body) if body and resp.content_type == "application/json" else body
            if expect is not None:
                assert resp.status == expect, (resp.status, data)
            return data

    async def product(self, pk: str = "pk1") -> str:
        if pk not in self.products:
            await self.call("POST", "/products", 201, json={"productKey": pk, "name": pk})
            self.products.add(pk)
        return pk

    async def device(self, dk: str, pk: str = "pk1", **extra: Any) -> dict[str, Any]:
        await self.product(pk)
        data: dict[str, Any] = await self.call("POST", f"/products/{pk}/devices", 201, json={"deviceKey": dk, **extra})
        return data

    async def firmware(self, pk: str, version: str, content: bytes, **fields: str) -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("name", fields.pop("name", f"fw-{version}"))
        form.add_field("version", version)
        for k, v in fields.items():
            form.add_field(k, v)
        form.add_field("file", content, filename="fw.bin", content_type="application/octet-stream")
        data: dict[str, Any] = await self.call("POST", f"/products/{pk}/firmware", 201, data=form)
        return data


async def start_server(tmp_path: Path, **overrides: Any) -> App:
    settings = Settings(data_dir=str(tmp_path / "data"), host="127.0.0.1", http_port=0, mqtt_port=0, **overrides)
    app = App(settings, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    return app


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Override in a test module to change settings of the `server` fixture."""
    return {}


@pytest.fixture
async def server(
    tmp_path: Path, server_settings: dict[str, Any], server_database: dict[str, str]
) -> AsyncIterator[Server]:
    app = await start_server(tmp_path, **server_database, **server_settings)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield Server(app, http, f"http://127.0.0.1:{app.http_port}", tmp_path / "data")
    await stop_within(app)


async def stop_within(app: App, seconds: float = 30) -> None:
    """Stop `app`, failing with every task's stack when that takes longer than `seconds`.

    A stop that hangs would otherwise hang the whole run: pytest-timeout's signal cannot
    interrupt a test's event loop (asyncio catches the exception in whichever callback it hits).
    """
    try:
        async with asyncio.timeout(seconds):
            await app.stop()
    except TimeoutError:
        out = io.StringIO()
        for t in asyncio.all_tasks():
            t.print_stack(file=out)
        pytest.fail(f"App.stop() took over {seconds} s; tasks:\n{out.getvalue()}")


def serve_command(data_dir: Path, *extra: str) -> list[str]:
    """`python -m otabox serve` on free loopback ports in `data_dir` (for tests of the real process)."""
    return [sys.executable, "-m", "otabox", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
            "--http-port", "0", "--mqtt-port", "0", *extra]  # fmt: skip


def credentials(pk: str, dk: str, secret: str, method: str = "hmacsha256", ts: str | None = None) -> dict[str, Any]:
    """EnOS secure-mode-2 MQTT credentials, computed the way the EnOS SDKs do."""
    ts = ts or str(time.time() * 1000)
    password = protocol.sign(protocol.login_params(dk, pk, ts), secret, method)
    return {
        "identifier": protocol.client_id_for(dk, method, ts),
        "username": f"{dk}&{pk}",
        "password": password,
    }


def mqtt_client(server: Server, pk: str, dk: str, secret: str, **kw: Any) -> aiomqtt.Client:
    creds = credentials(pk, dk, secret, kw.pop("method", "hmacsha256"))
    creds.update(kw)
    return aiomqtt.Client("127.0.0.1", server.mqtt_port, timeout=10, **creds)


async def next_message(client: aiomqtt.Client, topic_suffix: str, timeout: float = 10) -> dict[str, Any]:
    """The next message whose topic ends with `topic_suffix`, as JSON."""
    async with asyncio.timeout(timeout):
        async for msg in client.messages:
            if str(msg.topic).endswith(topic_suffix):
                payload = msg.payload
                assert isinstance(payload, bytes | bytearray)
                data: dict[str, Any] = json.loads(payload)
                return data
    raise AssertionError("message stream ended")


async def request(client: aiomqtt.Client, pk: str, dk: str, suffix: str, params: Any, msg_id: str = "1") -> Any:
    """Publish a device request and return the reply (the device does not subscribe)."""
    await client.publish(
        protocol.topic_for(pk, dk, suffix),
        json.dumps({"id": msg_id, "version": "1.0", "method": "x", "params": params}),
        qos=1,
    )
    return await next_message(client, suffix + "_reply")


async def wait_for(predicate: Any, timeout: float = 10, interval: float = 0.02) -> Any:
    """Poll an async predicate until truthy (for state owned by another process or loop)."""
    async with asyncio.timeout(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(interval)


class Device:
    """A scripted test device over a real MQTT connection (aiomqtt), collecting what it receives."""

    def __init__(self, server: Server, pk: str, dk: str, secret: str) -> None:
        self.server, self.pk, self.dk, self.secret = server, pk, dk, secret
        self.client: aiomqtt.Client | None = None
        self.inbox: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ids = 0

    def queue(self, suffix: str) -> asyncio.Queue[dict[str, Any]]:
        return self.inbox.setdefault(suffix, asyncio.Queue())

    async def connect(self, version: str | None = None, port: int | None = None) -> Device:
        creds = credentials(self.pk, self.dk, self.secret)
        self.client = aiomqtt.Client("127.0.0.1", port or self.server.mqtt_port, timeout=10, **creds)
        await self.client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        if version is not None:
            assert (await self.call(protocol.INFORM, {"version": version}))["code"] == 200
        return self

    async def _read(self) -> None:
        assert self.client is not None
        try:
            async for msg in self.client.messages:
                suffix = str(msg.topic).removeprefix(protocol.device_prefix(self.pk, self.dk))
                payload = msg.payload
                assert isinstance(payload, bytes | bytearray)
                self.queue(suffix).put_nowait(json.loads(payload))
        except aiomqtt.MqttError:
            pass  # the server went away (tests that stop it on purpose)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.client is not None:
            await self.client.__aexit__(None, None, None)
            self.client = None

    async def call(self, suffix: str, params: Any) -> dict[str, Any]:
        assert self.client is not None
        self._ids += 1
        await self.client.publish(
            protocol.topic_for(self.pk, self.dk, suffix),
            json.dumps({"id": str(self._ids), "version": "1.0", "method": "x", "params": params}),
            qos=1,
        )
        return await self.next(suffix + "_reply")

    async def next(self, suffix: str, timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return await self.queue(suffix).get()

    async def push(self, timeout: float = 10) -> dict[str, Any]:
        params: dict[str, Any] = (await self.next(protocol.UPGRADE, timeout))["params"]
        return params

    async def upgrade(self, to_version: str | None = None) -> dict[str, Any]:
        """Take the next push, report progress and the new version."""
        params = await self.push()
        assert (await self.call(protocol.PROGRESS, {"step": "50", "desc": "downloading"}))["code"] == 200
        assert (await self.call(protocol.INFORM, {"version": to_version or params["version"]}))["code"] == 200
        return params


def make_csr(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A device's own key and a PEM certificate signing request for it (the key stays here)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="session")
def enos_python() -> Path:
    """The EnOS SDK venv's python; building it is part of the suite, so failure fails (never skips)."""
    try:
        return ensure_enos_venv()
    except EnosVenvError as exc:
        pytest.fail(f"cannot build the EnOS SDK virtualenv: {exc}", pytrace=False)
